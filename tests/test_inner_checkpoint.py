"""Inner-loop activation checkpointing (MAML(inner_checkpoint=...)): the recomputed inner
loop gives the stored-graph path's query losses and meta-gradients (float64, 1e-12), and
the tensors saved for backward grow with the segment length, not with the steps.
(higher is the reference in tests/test_maml_vs_higher.py.)"""

import copy
import itertools

import pytest
import torch
from torch import nn

import mamlext
from mamlext import modules as mm
from mamlext.bench.memory import SavedTensorMeter
from mamlext.heap import GlibcHeap, resident_bytes
from mamlext.maml.recompute import auto_segment_length
from tests.models import F64, conv_bn

TASKS, WAYS, SHOTS = 3, 3, 2


def dropout_mlp():
    """An MLP whose inner loop draws random numbers (dropout) at every step."""
    return mm.MetaSequential(
        mm.MetaLinear(6, 12), nn.Dropout(0.3), nn.Tanh(), mm.MetaLinear(12, WAYS)
    ).to(F64)


def episode(tasks=TASKS, image=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 8, 8) if image else (6,)
    xs = torch.randn(tasks, WAYS * SHOTS, *shape, generator=g, dtype=F64)
    xq = torch.randn(tasks, WAYS * SHOTS, *shape, generator=g, dtype=F64)
    ys = torch.randint(0, WAYS, (tasks, WAYS * SHOTS), generator=g)
    yq = torch.randint(0, WAYS, (tasks, WAYS * SHOTS), generator=g)
    return xs, ys, xq, yq


def twin_mamls(model, segment, **options):
    """Two MAMLs on copies of ``model``: storing the inner loop, and checkpointing it.

    Learned rates start away from their initial value and differ by tensor and step.
    """
    stored = mamlext.MAML(copy.deepcopy(model), step_size=0.3, **options).to(F64)
    with torch.no_grad():
        for i, rates in enumerate(stored.step_sizes.rates):
            rates.copy_(0.1 + 0.3 * torch.rand_like(rates) + 0.01 * i)
    checkpointed = copy.deepcopy(stored)
    checkpointed.inner_checkpoint = segment
    return stored, checkpointed


def meta_gradients(maml, data, backward="forward", seed=0, **call):
    """Query loss and the meta-gradients of every parameter (zero where none flows)."""
    maml.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both paths
    if backward == "forward":
        loss, _ = maml(*data, **call)
        loss.backward()
    else:
        loss, _ = maml.meta_backward(*data, tasks_per_pass=2, **call)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in maml.parameters()]
    return loss.detach(), grads


def assert_same(stored, checkpointed, data, backward="forward", **call):
    loss_a, grads_a = meta_gradients(stored, data, backward, **call)
    loss_b, grads_b = meta_gradients(checkpointed, data, backward, **call)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    # relative to the whole meta-gradient: a conv bias before BatchNorm has a gradient
    # that is mathematically zero, whose own relative error is noise
    scale = torch.cat([g.flatten() for g in grads_a]).norm()
    assert scale > 0
    names = [n for n, _ in stored.named_parameters()]
    for name, a, b in zip(names, grads_a, grads_b):
        error = float((a - b).norm() / scale)
        assert error < 1e-12, f"meta-gradient of {name}: {error:.1e} of the gradient's norm"
    for (name, a), b in zip(stored.state_dict().items(), checkpointed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=f"buffer {name}")


@pytest.mark.parametrize("segment", [1, 2, 3, "auto"])
@pytest.mark.parametrize("mode", ["fixed", "per_element", "per_layer_per_step"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-task"])
def test_equals_the_stored_graph(batched, first_order, mode, segment):
    """5 steps (not a multiple of 2 or 3), Conv + BatchNorm, every step-size mode."""
    stored, checkpointed = twin_mamls(
        conv_bn(meta=True), segment, num_steps=5, first_order=first_order,
        step_size_mode=mode, batched=batched,
    )  # fmt: skip
    assert_same(stored, checkpointed, episode())


@pytest.mark.parametrize("bn", ["transductive", "per_step", "running", None])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-task"])
def test_every_batchnorm_policy_records_statistics_once(bn, batched):
    """Running statistics after four meta-batches equal the stored path's: the recomputation
    in backward records nothing (``None``: nn.BatchNorm's own momentum updates)."""
    stored, checkpointed = twin_mamls(
        conv_bn(meta=True), 2, num_steps=3, bn=bn, batched=batched,
        step_size_mode="per_layer_per_step",
    )  # fmt: skip
    committed = {}  # the per-task statistics each commit averages: (layer, row, shape)
    for name, maml in (("stored", stored), ("checkpointed", checkpointed)):
        commit, committed[name] = maml.bn_policy.commit, []
        layer_names = {module: n for n, module in maml.model.named_modules()}
        maml.bn_policy.commit = lambda records, log=committed[name], commit=commit, ln=layer_names: (
            log.append(sorted((ln[layer], row, m.shape) for layer, row, (m, _) in records)),
            commit(records),
        )  # fmt: skip
    for seed in (1, 2):
        assert_same(stored, checkpointed, episode(seed=seed))
        # meta_backward's backward runs inside the meta-batch, where recording is on
        assert_same(stored, checkpointed, episode(seed=seed), backward="meta_backward")
    assert committed["checkpointed"] == committed["stored"]
    assert len(committed["stored"]) == (4 if bn in ("per_step", "running") else 0)
    buffers = dict(stored.named_buffers())
    if bn in ("per_step", "running"):
        assert any(b.abs().sum() > 0 for n, b in buffers.items() if "step_running_mean" in n)
    if bn is None:  # nn.BatchNorm counts its updates: one per forward, none per replay
        counts = {int(b) for n, b in buffers.items() if n.endswith("num_batches_tracked")}
        # 3 support forwards + 1 query per call: of all tasks, of each pass of meta_backward
        # (2 + 1 tasks), or of each task; two forward and two meta_backward meta-batches
        calls_per_seed = (1 + 2) if batched else (TASKS + TASKS)
        assert counts == {2 * 4 * calls_per_seed}


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-task"])
def test_anil_dropout_and_meta_backward_passes(batched):
    """Only the head adapted (the body's gradient flows through the recomputation as an
    input), dropout at every step (the replay draws the same masks), meta_backward in
    passes of 2 tasks (its backward runs inside the meta-batch)."""
    for adapt in (None, "3"):  # "3": the last Linear only
        stored, checkpointed = twin_mamls(
            dropout_mlp(), 2, num_steps=5, batched=batched, adapt_params=adapt,
            step_size_mode="per_element", bn="per_step",
        )  # fmt: skip
        data = episode(image=False)
        assert_same(stored, checkpointed, data)
        assert_same(stored, checkpointed, data, backward="meta_backward")


def test_dropout_is_random_and_replayed():
    """Guard for the test above: dropout changes the result, so the replay must match it."""
    stored, _ = twin_mamls(dropout_mlp(), None, num_steps=3)
    data = episode(image=False)
    loss_a, _ = meta_gradients(stored, data, seed=0)
    loss_b, _ = meta_gradients(stored, data, seed=1)
    assert loss_a != loss_b


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-task"])
def test_inputs_that_require_grad_get_the_stored_gradient(batched):
    """The support images' gradient flows through the recomputed steps too (e.g. for an
    attack on the support set, or a learned augmentation before MAML)."""
    stored, checkpointed = twin_mamls(conv_bn(meta=True), 2, num_steps=3, batched=batched)
    xs, ys, xq, yq = episode()
    grads = []
    for maml in (stored, checkpointed):
        support, query = xs.clone().requires_grad_(), xq.clone().requires_grad_()
        loss, _ = maml(support, ys, query, yq)
        grads.append(torch.autograd.grad(loss, (support, query)))
    for name, a, b in zip(("support", "query"), *grads):
        assert a.norm() > 0
        error = float((a - b).norm() / a.norm())
        assert error < 1e-12, f"gradient of the {name} images: {error:.1e} of its norm"


@pytest.mark.parametrize("steps", [0, 1, 7])
def test_other_step_counts_at_call_time(steps):
    stored, checkpointed = twin_mamls(conv_bn(meta=True), 3, num_steps=2)
    assert_same(stored, checkpointed, episode(), num_steps=steps)


def test_plain_batchnorm_running_statistics_are_refused():
    """torch's own nn.BatchNorm updates its statistics in every training forward, which the
    recomputation would repeat: a clear error (mamlext's MetaBatchNorm skips it)."""
    model = mm.MetaSequential(
        mm.MetaConv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), mm.MetaLinear(144, WAYS)
    ).to(F64)
    maml = mamlext.MAML(model, bn=None, inner_checkpoint=1, num_steps=2)
    with pytest.raises(ValueError, match="'1' is a BatchNorm2d that updates its running"):
        maml(*episode())


@pytest.mark.parametrize("bad", [0, -2, "sqrt", True, 1.5, "1"])
def test_bad_settings_are_a_clear_error(bad):
    message = "inner_checkpoint must be None .* 'auto', or a segment"
    with pytest.raises(ValueError, match=message):
        mamlext.MAML(conv_bn(meta=True), inner_checkpoint=bad)
    maml = mamlext.MAML(conv_bn(meta=True))
    with pytest.raises(ValueError, match=message):
        maml.inner_checkpoint = bad


def test_auto_segment_length_minimises_the_modelled_peak():
    """``ceil(K/n) s + n g`` over every n, against the closed form's choice."""

    def peak(m, steps, s, g):
        return -(-steps // m) * s + m * g

    for steps, s, g in itertools.product([1, 2, 5, 25, 100], [1, 10, 100], [1, 10, 100]):
        n = auto_segment_length(steps, s, g)
        assert 1 <= n <= steps
        best = min(peak(m, steps, s, g) for m in range(1, steps + 1))
        assert peak(n, steps, s, g) <= 1.5 * best, (steps, s, g, n)
    assert auto_segment_length(100, 1, 1) == 10  # sqrt(K) when a step's graph is the state's size
    assert auto_segment_length(100, 1, 100) == 1  # activations >> state: recompute every step


def peak_saved_bytes(steps, segment):
    """Peak bytes saved for backward over one second-order meta-training step."""
    torch.manual_seed(0)
    model = conv_bn(meta=True, channels=8)
    maml = mamlext.MAML(model, num_steps=steps, inner_checkpoint=segment, batched=True).to(F64)
    xs, ys, xq, yq = episode(tasks=2)
    meter = SavedTensorMeter()
    with meter.hooks():
        loss, _ = maml(xs, ys, xq, yq)
        loss.backward()
        del loss
    assert meter.now == 0  # every saved tensor was released: the meter saw all of them
    return meter.peak


def test_saved_tensors_grow_with_the_segment_not_with_the_steps():
    stored = {k: peak_saved_bytes(k, None) for k in (4, 16)}
    one = {k: peak_saved_bytes(k, 1) for k in (4, 16)}
    four = peak_saved_bytes(16, 4)
    per_step = (stored[16] - stored[4]) / 12  # what the stored path keeps per extra step
    assert per_step > 0
    # checkpointed: 12 more steps add only 12 saved states, far less than 12 step graphs
    assert one[16] - one[4] < 0.25 * (stored[16] - stored[4]), (one, stored)
    assert one[16] < 0.5 * stored[16]
    # a longer segment keeps more steps' graphs alive during its recomputation
    assert four - one[16] > 2 * per_step, (four, one[16], per_step)


@pytest.mark.skipif(GlibcHeap.load() is None, reason="Linux with glibc >= 2.33 only")
def test_unused_resident_heap_memory_goes_back_to_the_system():
    """Freed memory that glibc keeps resident (holes between live blocks) is returned once
    it exceeds the margin over the least seen, as the kernel's RSS count shows."""
    heap = GlibcHeap.load()
    heap.trim()  # no free page resident, as in a process that just started
    heap.release_if_idle()  # the least unused memory seen: this process as it is now
    blocks = [torch.ones(25_000) for _ in range(2_500)]  # 100 kB each, in glibc's heap
    kept = blocks[::10]  # live blocks between the holes keep glibc from trimming them
    del blocks
    before = resident_bytes()
    heap.release_if_idle()
    released = before - resident_bytes()
    assert released > 0.8 * (200 << 20), released  # of the ~225 MB freed
    assert all(bool((block == 1).all()) for block in kept)  # live memory untouched
