"""mamlext.MAML (task-batched and per-task) against the per-task higher loop, float64."""

import functools
from collections import OrderedDict

import higher
import pytest
import torch
import torch.nn.functional as F

import mamlext
from tests.models import F64, MODELS, twins

WAYS, SHOTS, QUERY = 3, 2, 3
TOL = dict(rtol=1e-10, atol=1e-10)


def episode(make_input, tasks, seed=1):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xs, xq = make_input(tasks, WAYS * SHOTS), make_input(tasks, WAYS * QUERY)
    ys = torch.randint(0, WAYS, (tasks, WAYS * SHOTS), generator=g)
    yq = torch.randint(0, WAYS, (tasks, WAYS * QUERY), generator=g)
    return xs, ys, xq, yq


def higher_reference(
    plain, xs, ys, xq, yq, steps, first_order, lrs_per_step, loss_fn=F.cross_entropy
):
    """The MAML reference: higher.innerloop_ctx per task (copy_initial_weights=False).

    ``lrs_per_step(step)`` gives one learning rate (float or tensor) per parameter.
    """
    params = list(plain.parameters())
    opt = torch.optim.SGD([{"params": [p]} for p in params], lr=1.0)
    losses, adapted = [], []
    for t in range(xs.shape[0]):
        with higher.innerloop_ctx(
            plain, opt, copy_initial_weights=False, track_higher_grads=not first_order
        ) as (fmodel, diffopt):
            for step in range(steps):
                diffopt.step(loss_fn(fmodel(xs[t]), ys[t]), override={"lr": lrs_per_step(step)})
            losses.append(loss_fn(fmodel(xq[t]), yq[t]))
            adapted.append([p for p in fmodel.parameters()])
    return torch.stack(losses), adapted


def first_order_reference(plain, xs, ys, xq, yq, steps, lrs_per_step):
    """FOMAML by hand (higher's track_higher_grads=False cuts the graph to theta too)."""
    names, params = zip(*plain.named_parameters())
    losses, adapted = [], []
    for t in range(xs.shape[0]):
        fast = list(params)
        for step in range(steps):
            out = torch.func.functional_call(plain, dict(zip(names, fast)), (xs[t],))
            grads = torch.autograd.grad(F.cross_entropy(out, ys[t]), fast)
            fast = [p - lr * g.detach() for p, g, lr in zip(fast, grads, lrs_per_step(step))]
        out = torch.func.functional_call(plain, dict(zip(names, fast)), (xq[t],))
        losses.append(F.cross_entropy(out, yq[t]))
        adapted.append(fast)
    return torch.stack(losses), adapted


def compare(
    name, tasks, steps, first_order, batched, step_size_mode="fixed", inner_checkpoint=None
):
    plain, meta, make_input = twins(name)
    xs, ys, xq, yq = episode(make_input, tasks)
    maml = mamlext.MAML(
        meta, step_size=0.3, num_steps=steps, first_order=first_order,
        step_size_mode=step_size_mode, batched=batched, inner_checkpoint=inner_checkpoint,
    ).to(F64)  # fmt: skip
    # learned rates start away from their initial value, so a mix-up would show
    learned = maml.step_sizes.rates
    with torch.no_grad():
        for rates in learned:
            rates.uniform_(0.1, 0.5)
    assert maml.batched == batched

    # The reference uses the same rate tensors, so their meta-gradients compare too.
    names = [n for n, _ in meta.meta_named_parameters()]
    assert names == [n for n, _ in plain.named_parameters()]
    assert len(learned) == (0 if step_size_mode == "fixed" else len(names))

    def lrs_per_step(step):
        if step_size_mode == "per_element":  # Meta-SGD: one rate per element, every step
            return learned
        if step_size_mode == "per_layer_per_step":  # MAML++: rates [steps] per tensor
            return [rates[step] for rates in learned]
        return [0.3] * len(names)

    if first_order:
        ref_losses, ref_adapted = first_order_reference(plain, xs, ys, xq, yq, steps, lrs_per_step)
    else:
        ref_losses, ref_adapted = higher_reference(
            plain, xs, ys, xq, yq, steps, first_order, lrs_per_step
        )
    ref_params = list(plain.parameters()) + learned
    ref_grads = torch.autograd.grad(ref_losses.mean(), ref_params, allow_unused=True)

    loss, logits = maml(xs, ys, xq, yq)
    ours_params = list(meta.parameters()) + learned
    grads = torch.autograd.grad(loss, ours_params, allow_unused=True)

    per_task = (
        F.cross_entropy(logits.flatten(0, 1), yq.flatten(), reduction="none")
        .view(tasks, -1)
        .mean(1)
    )
    torch.testing.assert_close(per_task, ref_losses, **TOL)
    for n, g, r in zip(names + ["lr"] * len(learned), grads, ref_grads):
        if r is None:  # e.g. the embedding's padding row gets no gradient in either
            assert g is None or g.abs().max() == 0, n
        else:
            torch.testing.assert_close(g, r, **TOL, msg=lambda m, n=n: f"meta-gradient of {n}: {m}")
    adapted = maml.adapt(xs, ys)
    for i, n in enumerate(names):
        want = torch.stack([ref_adapted[t][i] for t in range(tasks)])
        torch.testing.assert_close(adapted[n], want, **TOL, msg=lambda m, n=n: f"adapted {n}: {m}")


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-task"])
@pytest.mark.parametrize("tasks", [1, 3])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("name", list(MODELS))
def test_maml_equals_higher(name, first_order, steps, tasks, batched):
    compare(name, tasks, steps, first_order, batched)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-task"])
@pytest.mark.parametrize("mode", ["per_element", "per_layer_per_step"])
@pytest.mark.parametrize("name", ["conv-batchnorm2d", "mlp-layernorm"])
def test_learned_step_sizes_equal_higher(name, mode, batched):
    compare(name, tasks=3, steps=3, first_order=False, batched=batched, step_size_mode=mode)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-task"])
@pytest.mark.parametrize("segment", [1, 2, 3])
@pytest.mark.parametrize("steps", range(1, 8))
@pytest.mark.parametrize("name", ["conv-batchnorm2d", "mlp-layernorm"])
def test_inner_checkpointing_equals_higher(name, steps, segment, batched):
    """The recomputed inner loop (mamlext.maml.recompute) against higher's stored graph."""
    compare(
        name, tasks=2, steps=steps, first_order=False, batched=batched, inner_checkpoint=segment
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_meta_gradient_matches_central_finite_differences(name):
    """Every norm layer: d(meta-loss)/d(theta) along random directions, against FD."""
    _, meta, make_input = twins(name)
    xs, ys, xq, yq = episode(make_input, tasks=2)
    maml = mamlext.MAML(meta, step_size=0.3, num_steps=2).to(F64)
    params = list(meta.parameters())
    loss, _ = maml(xs, ys, xq, yq)
    grads = torch.autograd.grad(loss, params)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=F64) for p in params]
        for module in meta.modules():  # the padding row is excluded from gradients by design
            if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                direction[[p is module.weight for p in params].index(True)][module.padding_idx] = 0
        analytic = sum((g * d).sum() for g, d in zip(grads, direction))
        eps = 1e-6
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(sign * eps * d)
            values.append(maml(xs, ys, xq, yq)[0].item())
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.sub_(sign * eps * d)
        numeric = (values[0] - values[1]) / (2 * eps)
        assert abs(numeric - analytic.item()) <= 1e-6 * max(1.0, abs(numeric)), (numeric, analytic)


def smoothed_cross_entropy(outputs, targets, reduction="mean"):
    """A loss mamlext does not know, which the caller may declare per-sample."""
    return F.cross_entropy(outputs, targets, label_smoothing=0.1, reduction=reduction)


@pytest.mark.parametrize(
    "loss_fn,per_sample_loss,one_call",
    [
        (functools.partial(F.cross_entropy, label_smoothing=0.1), None, True),
        (lambda outputs, targets: smoothed_cross_entropy(outputs, targets), None, False),
        (smoothed_cross_entropy, None, False),
        (smoothed_cross_entropy, True, True),
        (functools.partial(F.cross_entropy, label_smoothing=0.1), False, False),
    ],
    ids=["partial", "lambda", "custom", "custom-declared", "partial-declined"],
)
def test_loss_with_keywords_takes_its_path_and_equals_higher(loss_fn, per_sample_loss, one_call):
    """One loss call over all tasks when the loss gives per-sample values, else one per task."""
    plain, meta, make_input = twins("conv-batchnorm2d")
    xs, ys, xq, yq = episode(make_input, tasks=3)
    maml = mamlext.MAML(
        meta, step_size=0.3, num_steps=2, loss_fn=loss_fn, per_sample_loss=per_sample_loss,
        batched=True,
    ).to(F64)  # fmt: skip
    assert maml.per_sample_loss is one_call
    lrs = [0.3] * len(list(plain.parameters()))
    ref_losses, _ = higher_reference(
        plain, xs, ys, xq, yq, 2, False, lambda step: lrs, loss_fn=smoothed_cross_entropy
    )
    ref = torch.autograd.grad(ref_losses.mean(), list(plain.parameters()))
    loss, _ = maml(xs, ys, xq, yq)
    grads = torch.autograd.grad(loss, list(meta.parameters()))
    torch.testing.assert_close(loss, ref_losses.mean(), **TOL)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, **TOL)


def test_a_partial_that_changes_the_mean_is_called_per_task():
    """Class weights make cross_entropy's mean a weighted one: not a plain per-sample mean."""
    weight = torch.tensor([1.0, 3.0, 0.5], dtype=F64)
    for bound in (dict(weight=weight), dict(reduction="sum"), dict(ignore_index=1)):
        loss_fn = functools.partial(F.cross_entropy, **bound)
        plain, meta, make_input = twins("mlp-layernorm")
        xs, ys, xq, yq = episode(make_input, tasks=2)
        maml = mamlext.MAML(meta, step_size=0.3, loss_fn=loss_fn, batched=True).to(F64)
        assert not maml.per_sample_loss, bound
        loss, _ = maml(xs, ys, xq, yq, num_steps=0)  # no adaptation: the loss at theta
        want = torch.stack([loss_fn(plain(xq[t]), yq[t]) for t in range(2)]).mean()
        torch.testing.assert_close(loss, want, **TOL)


def test_torchmeta_hand_derived_values():
    """torchmeta's own test of gradient_update_parameters, reproduced."""
    model = mamlext.modules.MetaLinear(3, 1, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 3.0, 5.0]], dtype=F64))
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    loss = 0.5 * model(x).pow(2).sum()
    params = mamlext.gradient_update_parameters(model, loss, step_size=0.5)
    torch.testing.assert_close(params["weight"], torch.tensor([[-9.5, -20.0, -29.5]], dtype=F64))
    x2 = torch.tensor([[4.0, 5.0, 6.0]], dtype=F64)
    meta_loss = 0.5 * model(x2, params=params).pow(2).sum()
    (meta_grad,) = torch.autograd.grad(meta_loss, model.weight)
    torch.testing.assert_close(meta_grad, torch.tensor([[3780.0, 8505.0, 13230.0]], dtype=F64))


def test_step_size_as_dict_and_tensor():
    model = mamlext.modules.MetaLinear(3, 2).to(F64)
    x = torch.randn(4, 3, dtype=F64)
    loss = model(x).pow(2).sum()
    grads = dict(
        zip(
            ["weight", "bias"],
            torch.autograd.grad(loss, list(model.parameters()), retain_graph=True),
        )
    )
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    params = mamlext.gradient_update_parameters(model, loss, step_size={"weight": lr, "bias": 0.2})
    torch.testing.assert_close(params["weight"], model.weight - 0.1 * grads["weight"])
    torch.testing.assert_close(params["bias"], model.bias - 0.2 * grads["bias"])
    (dlr,) = torch.autograd.grad(params["weight"].sum(), lr)
    torch.testing.assert_close(dlr, -grads["weight"].sum())


def test_anil_adapts_only_the_head_and_equals_higher_on_it():
    plain, meta, make_input = twins("conv-batchnorm2d")
    xs, ys, xq, yq = episode(make_input, tasks=3)
    names = [n for n, _ in meta.meta_named_parameters()]
    head = [n for n in names if n.startswith("9.")]
    maml = mamlext.MAML(meta, step_size=0.3, num_steps=2, adapt_params=["9"]).to(F64)
    assert maml.adapted_names == head
    loss, _ = maml(xs, ys, xq, yq)
    grads = torch.autograd.grad(loss, list(meta.parameters()))
    # reference: adapt only the head, per task, by hand
    body_names = [n for n in names if n not in head]
    ref_losses = []
    for t in range(3):
        fast = OrderedDict(plain.named_parameters())
        for _ in range(2):
            out = torch.func.functional_call(plain, dict(fast), (xs[t],))
            hg = torch.autograd.grad(
                F.cross_entropy(out, ys[t]), [fast[n] for n in head], create_graph=True
            )
            for n, g in zip(head, hg):
                fast[n] = fast[n] - 0.3 * g
        ref_losses.append(
            F.cross_entropy(torch.func.functional_call(plain, dict(fast), (xq[t],)), yq[t])
        )
    ref = torch.autograd.grad(torch.stack(ref_losses).mean(), list(plain.parameters()))
    for n, g, r in zip(names, grads, ref):
        torch.testing.assert_close(g, r, **TOL, msg=lambda m, n=n: f"{n}: {m}")
    adapted = maml.adapt(xs, ys)
    for n in body_names:
        assert adapted[n] is dict(meta.named_parameters())[n]  # shared, not copied per task


def test_meta_test_step_count_and_memory_does_not_grow():
    import gc
    import weakref

    _, meta, make_input = twins("conv-batchnorm2d")
    maml = mamlext.MAML(meta, step_size=0.3, num_steps=1, num_test_steps=3).to(F64)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    xs, ys, xq, yq = episode(make_input, tasks=2)
    refs, counts = [], []
    for _ in range(4):
        loss, _ = maml(xs, ys, xq, yq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        refs.append(weakref.ref(loss))
        del loss
        gc.collect()
        counts.append(
            sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter))
        )
    assert all(r() is None for r in refs)
    assert counts[1] == counts[-1], counts
    maml.eval()
    assert maml._steps(None) == 3


@pytest.mark.parametrize("tasks_per_pass", [None, 1, 2])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-task"])
def test_meta_backward_equals_forward_then_backward(batched, tasks_per_pass):
    results = []
    for use_meta_backward in (False, True):
        _, meta, make_input = twins("conv-batchnorm2d")
        maml = mamlext.MAML(
            meta, step_size=0.3, num_steps=2, batched=batched, bn="per_step",
            step_size_mode="per_layer_per_step",
        ).to(F64)  # fmt: skip
        xs, ys, xq, yq = episode(make_input, tasks=3)
        if use_meta_backward:
            loss, out = maml.meta_backward(xs, ys, xq, yq, tasks_per_pass=tasks_per_pass)
        else:
            loss, out = maml(xs, ys, xq, yq)
            loss.backward()
        grads = [p.grad for p in maml.parameters()]
        results.append((loss.detach(), out.detach(), grads, dict(maml.model.named_buffers())))
    (l0, o0, g0, b0), (l1, o1, g1, b1) = results
    torch.testing.assert_close(l1, l0, **TOL)
    torch.testing.assert_close(o1, o0, **TOL)
    torch.testing.assert_close(g1, g0, **TOL)
    torch.testing.assert_close(b1, b0, **TOL)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["conv-batchnorm2d", "mlp-layernorm", "embedding"])
def test_task_batched_maml_on_cuda_equals_higher_on_cpu(name):
    """The CUDA path (grouped cuDNN convolutions, the CUDA fused_sgd) against the CPU reference."""
    plain, meta, make_input = twins(name)
    xs, ys, xq, yq = episode(make_input, tasks=4)
    lrs = lambda step: [0.3] * len(list(plain.parameters()))  # noqa: E731
    ref_losses, _ = higher_reference(plain, xs, ys, xq, yq, 2, False, lrs)
    ref = torch.autograd.grad(ref_losses.mean(), list(plain.parameters()))
    torch.backends.cudnn.deterministic = True
    maml = mamlext.MAML(meta.cuda(), step_size=0.3, num_steps=2, batched=True)
    loss, _ = maml(*(t.cuda() for t in (xs, ys, xq, yq)))
    grads = torch.autograd.grad(loss, list(meta.parameters()))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-9, atol=1e-11)
