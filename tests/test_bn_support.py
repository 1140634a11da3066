"""``bn="support"``: each query normalised with its task's support statistics.

The reference is written by hand in float64: the inner loop with ``torch.autograd.grad``
(higher's, for second order) on the plain torch twin, then a query forward that computes
each BatchNorm's statistics from the support activations and passes them explicitly. And
the property the policy exists for: a query's prediction does not depend on the other
queries, checked for every policy that claims it (and shown to fail for the one that does
not).
"""

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mamlext
from tests.models import F64, twins
from tests.test_any_module import assert_meta_gradients_equal, finite_difference_check
from tests.test_maml_vs_higher import episode

STEP_SIZE = 0.3


def support_normalised_forward(plain: nn.Sequential, params: list, xs, xq):
    """``plain``'s outputs on ``xq`` with ``params``, every BatchNorm normalising with the
    batch statistics of the support activations at that layer (computed alongside)."""
    weights = iter(params)
    hs, hq = xs, xq
    for module in plain:
        if isinstance(module, nn.Conv2d):
            w, b = next(weights), next(weights)
            hs, hq = (F.conv2d(h, w, b, padding=module.padding) for h in (hs, hq))
        elif isinstance(module, nn.BatchNorm2d):
            w, b = next(weights), next(weights)
            mean = hs.mean((0, 2, 3), keepdim=True)
            var = hs.var((0, 2, 3), unbiased=False, keepdim=True)
            hs, hq = (
                (h - mean) / torch.sqrt(var + module.eps) * w.view(1, -1, 1, 1)
                + b.view(1, -1, 1, 1)
                for h in (hs, hq)
            )
        elif isinstance(module, nn.Linear):
            w, b = next(weights), next(weights)
            hs, hq = F.linear(hs, w, b), F.linear(hq, w, b)
        else:  # ReLU, MaxPool2d, Flatten: per sample
            hs, hq = module(hs), module(hq)
    return hq


def reference(plain, xs, ys, xq, yq, steps, first_order, step_weights=None):
    """Per task: ``steps`` inner SGD steps on the support set (batch statistics), then the
    query loss with support statistics; with ``step_weights`` the weighted sum over steps."""
    params = list(plain.parameters())
    losses = []
    for t in range(xs.shape[0]):
        terms = []
        if first_order:
            fast = params
            for _ in range(steps):
                names = [n for n, _ in plain.named_parameters()]
                out = torch.func.functional_call(plain, dict(zip(names, fast)), (xs[t],))
                grads = torch.autograd.grad(F.cross_entropy(out, ys[t]), fast)
                fast = [p - STEP_SIZE * g.detach() for p, g in zip(fast, grads)]
                terms.append(
                    F.cross_entropy(support_normalised_forward(plain, fast, xs[t], xq[t]), yq[t])
                )
        else:
            opt = torch.optim.SGD(params, lr=STEP_SIZE)
            with higher.innerloop_ctx(plain, opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fmodel(xs[t]), ys[t]))
                    fast = list(fmodel.parameters())
                    out = support_normalised_forward(plain, fast, xs[t], xq[t])
                    terms.append(F.cross_entropy(out, yq[t]))
        weights = [0.0] * (steps - 1) + [1.0] if step_weights is None else step_weights
        losses.append(sum(w * term for w, term in zip(weights, terms)))
    return torch.stack(losses).mean()


CASES = {  # name: (Meta layers?, batched, MAML keywords)
    "Meta, all tasks at once": (True, True, {}),
    "Meta, per task": (True, False, {}),
    "nn.Module, all tasks (vmap)": (False, True, {}),
    "nn.Module, per task": (False, False, {}),
    "inner checkpoint": (True, True, {"inner_checkpoint": 1}),
    "first order": (True, True, {"first_order": True}),
}


def support_maml(meta_layers: bool, batched, steps=2, seed=0, **kwargs):
    plain, meta, make_input = twins("conv-batchnorm2d", seed=seed)
    model = meta if meta_layers else plain
    maml = mamlext.MAML(
        model, step_size=STEP_SIZE, num_steps=steps, bn="support", batched=batched, **kwargs
    ).to(F64)
    return maml, model, make_input


@pytest.mark.parametrize("case", list(CASES))
def test_support_policy_equals_the_hand_written_reference(case):
    meta_layers, batched, kwargs = CASES[case]
    maml, model, make_input = support_maml(meta_layers, batched, **kwargs)
    reference_model, _, _ = twins("conv-batchnorm2d")
    xs, ys, xq, yq = episode(make_input, tasks=3)
    assert maml.use_batched(xs, xq) == batched
    loss, _ = maml(xs, ys, xq, yq)
    ref = reference(reference_model, xs, ys, xq, yq, 2, kwargs.get("first_order", False))
    assert_meta_gradients_equal(
        loss, ref, list(model.parameters()), list(reference_model.parameters())
    )


@pytest.mark.parametrize("batched", [True, False])
def test_the_multi_step_loss_normalises_each_steps_query_with_that_steps_support(batched):
    maml, model, make_input = support_maml(True, batched, steps=3)
    reference_model, _, _ = twins("conv-batchnorm2d")
    xs, ys, xq, yq = episode(make_input, tasks=2)
    weights = [0.2, 0.3, 0.5]
    loss, _ = maml(xs, ys, xq, yq, step_weights=weights)
    ref = reference(reference_model, xs, ys, xq, yq, 3, False, weights)
    assert_meta_gradients_equal(
        loss, ref, list(model.parameters()), list(reference_model.parameters())
    )


@pytest.mark.parametrize("batched", [True, False])
def test_support_meta_gradient_against_finite_differences(batched):
    maml, model, make_input = support_maml(True, batched)
    xs, ys, xq, yq = episode(make_input, tasks=2)
    finite_difference_check(maml, model, xs, ys, xq, yq)


# ---- what a query's prediction depends on ---------------------------------------------------

INDEPENDENT = [  # (policy, training): predictions claimed independent of the other queries
    ("support", True),
    ("support", False),
    ("per_step", False),
    ("running", False),
]


def query_outputs_with_other_queries_changed(policy, training, batched, meta_layers=True):
    """Query 0's outputs, then again with every other query of its task replaced."""
    _, meta, make_input = twins("conv-batchnorm2d")
    plain, _, _ = twins("conv-batchnorm2d")
    model = meta if meta_layers else plain
    maml = mamlext.MAML(model, step_size=STEP_SIZE, num_steps=2, bn=policy, batched=batched)
    xs, ys, xq, yq = episode(make_input, tasks=2)
    if not training:
        maml(xs, ys, xq, yq)  # train the running statistics (if any) once
        maml.eval()
    _, out = maml(xs, ys, xq, yq)
    others = xq.clone()
    others[:, 1:] = make_input(2, xq.shape[1] - 1) * 3 + 1  # other queries, another scale
    _, changed = maml(xs, ys, others, yq)
    return out[:, 0], changed[:, 0]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("policy,training", INDEPENDENT)
def test_a_query_prediction_does_not_depend_on_the_other_queries(policy, training, batched):
    before, after = query_outputs_with_other_queries_changed(policy, training, batched)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batched", [True, False])
def test_a_plain_modules_prediction_under_support_does_not_depend_on_the_other_queries(batched):
    before, after = query_outputs_with_other_queries_changed("support", False, batched, False)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_a_transductive_prediction_does_depend_on_the_other_queries(training):
    before, after = query_outputs_with_other_queries_changed("transductive", training, True)
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("batched", [True, False])
def test_one_query_at_a_time_gives_the_whole_tasks_predictions(batched):
    maml, _, make_input = support_maml(True, batched)
    xs, ys, xq, yq = episode(make_input, tasks=2)
    maml.eval()
    with torch.no_grad():
        _, whole = maml(xs, ys, xq, yq)
        single = torch.cat(
            [maml(xs, ys, xq[:, i : i + 1], yq[:, i : i + 1])[1] for i in range(xq.shape[1])], 1
        )
    torch.testing.assert_close(single, whole, rtol=1e-12, atol=1e-12)


def test_support_never_touches_running_statistics():
    maml, model, make_input = support_maml(True, True)
    before = {
        k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k
    }
    xs, ys, xq, yq = episode(make_input, tasks=2)
    maml(xs, ys, xq, yq)[0].backward()
    maml.eval()
    maml(xs, ys, xq, yq)
    for k, v in model.state_dict().items():
        if k in before:
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)


# ---- adapt, then predict ---------------------------------------------------------------------


@pytest.mark.parametrize("batched", [True, False])
def test_predict_after_adapt_equals_the_query_outputs_of_a_meta_batch(batched):
    maml, _, make_input = support_maml(True, batched)
    xs, ys, xq, yq = episode(make_input, tasks=2)
    maml.eval()
    _, outputs = maml(xs, ys, xq, yq)
    fast = maml.adapt(xs, ys)
    torch.testing.assert_close(maml.predict(fast, xq, xs), outputs, rtol=1e-12, atol=1e-12)


def test_a_query_forward_without_its_support_set_is_refused():
    maml, model, make_input = support_maml(True, True)
    xs, ys, xq, _ = episode(make_input, tasks=2)
    maml.eval()
    fast = maml.adapt(xs, ys)
    with pytest.raises(ValueError, match="given no support set"):
        model(xq, params=fast)
    with pytest.raises(ValueError, match="pass support_x"):
        maml.predict(fast, xq)


def test_support_and_query_inputs_of_different_shapes_are_refused_by_name():
    maml, _, make_input = support_maml(True, True)
    xs, ys, _, yq = episode(make_input, tasks=2)
    xq = torch.randn(2, yq.shape[1], 1, 6, 6, dtype=F64)
    with pytest.raises(ValueError, match="support .* and query .*"):
        maml(xs, ys, xq, yq)


class ShiftedInput(nn.Module):
    """``model(x, shift)`` = ``inner(x + shift)``: a forward with two inputs."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, shift):
        return self.inner(x + shift)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("as_dict", [True, False])
def test_several_inputs_carry_their_support_samples_too(batched, as_dict):
    plain, _, make_input = twins("conv-batchnorm2d")
    two, _, _ = twins("conv-batchnorm2d")
    one = mamlext.MAML(plain, step_size=STEP_SIZE, num_steps=2, bn="support", batched=batched)
    both = mamlext.MAML(ShiftedInput(two), step_size=STEP_SIZE, num_steps=2, bn="support",
                        batched=batched)  # fmt: skip
    xs, ys, xq, yq = episode(make_input, tasks=2)
    ss, sq = make_input(2, xs.shape[1]), make_input(2, xq.shape[1])
    wrap = (lambda x, s: {"x": x, "shift": s}) if as_dict else (lambda x, s: (x, s))
    loss, out = both(wrap(xs, ss), ys, wrap(xq, sq), yq)
    ref_loss, ref_out = one(xs + ss, ys, xq + sq, yq)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert_meta_gradients_equal(loss, ref_loss, list(two.parameters()), list(plain.parameters()))
