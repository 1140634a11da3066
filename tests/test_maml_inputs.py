"""MAML's input contract: what would silently compute the wrong thing is a clear error."""

import pytest
import torch
import torch.nn.functional as F

import mamlext
from mamlext.models import mlp

PATHS = [True, False]  # task-batched, per-task


def regression(batched: bool) -> mamlext.MAML:
    torch.manual_seed(0)
    return mamlext.MAML(mlp((1, 8, 1)), step_size=0.1, loss_fn=F.mse_loss, batched=batched)


def classification(batched: bool) -> mamlext.MAML:
    torch.manual_seed(0)
    return mamlext.MAML(mlp((4, 8, 3)), step_size=0.1, batched=batched)


def sinusoid_batch(tasks=4, shots=5):
    x = torch.rand(tasks, 2 * shots, 1) * 10 - 5
    y = torch.sin(x + torch.arange(tasks).view(-1, 1, 1))
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


@pytest.mark.parametrize("batched", PATHS)
def test_regression_targets_that_would_broadcast_are_refused(batched):
    # [T, N] targets for [T, N, 1] outputs: once an [N, N] loss that mixed tasks.
    xs, ys, xq, yq = sinusoid_batch()
    with pytest.raises(ValueError, match=r"shape \(5, 1\) but its targets \(5,\).*unsqueeze"):
        regression(batched)(xs, ys.squeeze(-1), xq, yq.squeeze(-1))
    loss, _ = regression(batched)(xs, ys, xq, yq)  # the right shapes still train
    assert torch.isfinite(loss)


@pytest.mark.parametrize("batched", PATHS)
def test_a_task_s_targets_change_only_its_own_outputs(batched):
    """The symptom of the broadcast bug, checked directly: tasks stay independent."""
    xs, ys, xq, yq = sinusoid_batch()
    maml = regression(batched)
    _, before = maml(xs, ys, xq, yq)
    ys_changed = ys.clone()
    ys_changed[3] += 100.0
    _, after = maml(xs, ys_changed, xq, yq)
    torch.testing.assert_close(after[:3], before[:3], rtol=0, atol=0)
    assert not torch.allclose(after[3], before[3])


@pytest.mark.parametrize("steps", [-1, 1.5, True])
def test_a_bad_step_count_at_call_time_is_refused(steps):
    xs, ys, xq, yq = sinusoid_batch()
    with pytest.raises(ValueError, match="num_steps must be an integer >= 0"):
        regression(True)(xs, ys, xq, yq, num_steps=steps)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 0"):
        regression(True).adapt(xs, ys, num_steps=steps)


@pytest.mark.parametrize(
    "cut,message",
    [
        (lambda b: (b[0][:0], b[1][:0], b[2][:0], b[3][:0]), r"no task \(T = 0\)"),
        (lambda b: (b[0][:, :0], b[1][:, :0], b[2], b[3]), "support_x has 0 samples per task"),
        (lambda b: (b[0], b[1], b[2][:, :0], b[3][:, :0]), "query loss would be NaN"),
    ],
    ids=["no task", "empty support", "empty query"],
)
@pytest.mark.parametrize("batched", PATHS)
def test_empty_meta_batches_and_sets_are_refused(batched, cut, message):
    with pytest.raises(ValueError, match=message):
        regression(batched)(*cut(sinusoid_batch()))


@pytest.mark.parametrize("batched", PATHS)
def test_an_out_of_range_label_names_the_task_and_the_label(batched):
    torch.manual_seed(1)
    xs, xq = torch.randn(3, 6, 4), torch.randn(3, 6, 4)
    ys, yq = torch.arange(6).remainder(3).repeat(3, 1), torch.arange(6).remainder(3).repeat(3, 1)
    ys[2, 4] = 7
    with pytest.raises(ValueError, match=r"task 2 has target 7 \(sample 4\).*3 classes"):
        classification(batched)(xs, ys, xq, yq)
    ys[2, 4] = 1
    yq[1, 0] = -3
    with pytest.raises(ValueError, match=r"task 1 has target -3 \(sample 0\)"):
        classification(batched)(xs, ys, xq, yq)


@pytest.mark.parametrize("batched", PATHS)
@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss"])
def test_float_class_targets_are_named_as_a_dtype_mistake(batched, loss):
    """[T, N] float labels for a classification loss: the fix is the dtype, not the shape."""
    torch.manual_seed(0)
    maml = mamlext.MAML(mlp((4, 8, 3)), step_size=0.1, batched=batched, loss_fn=getattr(F, loss))
    x, y = torch.randn(2, 6, 4), torch.arange(3).repeat(2, 2)
    with pytest.raises(ValueError, match=r"torch\.float32 of shape \(6,\).*integer indices"):
        maml(x, y.float(), x, y.float())
    loss, _ = maml(x, y, x, y)  # integer labels train
    assert torch.isfinite(loss)
