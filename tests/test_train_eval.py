"""Train/eval and BatchNorm semantics in MAML: every claim of docs/train_eval.md, tested."""

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mamlext
from mamlext import modules as mm
from tests.models import F64, twins
from tests.test_maml_vs_higher import episode


def conv_bn_maml(bn, batched=True, steps=2, seed=0):
    _, meta, make_input = twins("conv-batchnorm2d", seed=seed)
    return mamlext.MAML(meta, step_size=0.3, num_steps=steps, bn=bn, batched=batched).to(
        F64
    ), make_input


def running_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}


# ---- .eval() and no_grad ------------------------------------------------------------------


def test_eval_mode_does_not_turn_off_gradients_but_no_grad_does():
    maml, make_input = conv_bn_maml("transductive")
    x = make_input(4)
    maml.model.eval()
    out = maml.model(x)
    assert out.requires_grad
    grads = torch.autograd.grad(out.sum(), list(maml.model.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        assert not maml.model(x).requires_grad


def test_query_loss_under_no_grad_gives_no_meta_gradient_and_warns():
    maml, make_input = conv_bn_maml("transductive")
    xs, ys, xq, yq = episode(make_input, tasks=2)
    with torch.no_grad(), pytest.warns(UserWarning, match=r"under torch.no_grad\(\).*no graph"):
        loss, _ = maml(xs, ys, xq, yq)
    assert not loss.requires_grad
    with pytest.raises(RuntimeError):
        loss.backward()


def test_meta_test_under_no_grad_still_adapts():
    """maml.eval() + no_grad: adaptation takes its gradients anyway; the result equals grad mode."""
    maml, make_input = conv_bn_maml("transductive", steps=1)
    xs, ys, xq, yq = episode(make_input, tasks=2)
    maml.eval()
    with torch.no_grad():
        loss_no_grad, out_no_grad = maml(xs, ys, xq, yq)
    loss, out = maml(xs, ys, xq, yq)
    torch.testing.assert_close(out_no_grad, out.detach())
    zero_step = maml(xs, ys, xq, yq, num_steps=0)[0]
    assert loss_no_grad.item() != pytest.approx(zero_step.item())


def test_in_place_optimizer_step_in_the_inner_loop_is_fine_tuning_not_maml():
    """The published recipe (torch.optim.SGD stepping the meta-parameters) loses the meta-gradient."""
    plain, meta, make_input = twins("mlp-layernorm")
    xs, ys, xq, yq = episode(make_input, tasks=1)
    # MAML (higher, copy_initial_weights=False): the exact meta-gradient
    inner = torch.optim.SGD(plain.parameters(), lr=0.3)
    with higher.innerloop_ctx(plain, inner, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(F.cross_entropy(fmodel(xs[0]), ys[0]))
        maml_grads = torch.autograd.grad(
            F.cross_entropy(fmodel(xq[0]), yq[0]), list(plain.parameters())
        )
    # The recipe: step in place, then backpropagate the query loss
    sgd = torch.optim.SGD(meta.parameters(), lr=0.3)
    sgd.zero_grad()
    F.cross_entropy(meta(xs[0]), ys[0]).backward()
    sgd.step()
    recipe_grads = torch.autograd.grad(F.cross_entropy(meta(xq[0]), yq[0]), list(meta.parameters()))
    # ... which is the query gradient at the adapted point, i.e. first-order MAML at best
    first_order = mamlext.MAML(
        twins("mlp-layernorm")[1], step_size=0.3, first_order=True, bn=None
    ).to(F64)
    loss, _ = first_order(xs, ys, xq, yq)
    fo_grads = torch.autograd.grad(loss, list(first_order.model.parameters()))
    for r, fo in zip(recipe_grads, fo_grads):
        torch.testing.assert_close(r, fo)
    assert any((r - m).abs().max() > 1e-3 for r, m in zip(recipe_grads, maml_grads))


def test_optimizer_step_before_backward_is_caught_with_a_clear_error():
    maml, make_input = conv_bn_maml("transductive")
    xs, ys, xq, yq = episode(make_input, tasks=2)
    opt = torch.optim.SGD(maml.parameters(), lr=0.1)
    loss, _ = maml(xs, ys, xq, yq)
    for p in maml.model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    with pytest.raises(RuntimeError, match=r"modified in place after MAML's forward"):
        loss.backward()


# ---- BatchNorm policies ---------------------------------------------------------------------


@pytest.mark.parametrize("batched", [True, False])
def test_transductive_never_touches_running_stats_and_ignores_eval_mode(batched):
    maml, make_input = conv_bn_maml("transductive", batched=batched)
    xs, ys, xq, yq = episode(make_input, tasks=3)
    before = running_stats(maml.model)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    for _ in range(2):
        loss, _ = maml(xs, ys, xq, yq)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = running_stats(maml.model)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    train_out = maml(xs, ys, xq, yq)[1]
    maml.eval()
    torch.testing.assert_close(maml(xs, ys, xq, yq)[1], train_out)


@pytest.mark.parametrize("policy", ["per_step", "running"])
def test_running_policies_same_in_batched_and_per_task_paths(policy):
    batched, make_input = conv_bn_maml(policy, batched=True)
    looped, _ = conv_bn_maml(policy, batched=False)
    xs, ys, xq, yq = episode(make_input, tasks=3)
    for maml in (batched, looped):
        for _ in range(2):
            maml(xs, ys, xq, yq)[0].backward()
    b, lo = running_stats(batched.model), running_stats(looped.model)
    assert b.keys() == lo.keys()
    for k in b:
        torch.testing.assert_close(b[k], lo[k], msg=lambda m, k=k: f"{k}: {m}")
    rows = 2 + 1 if policy == "per_step" else 1
    assert batched.model[1].step_running_mean.shape == (rows, 4)
    # the running statistics moved, and each set differently under per_step
    stats = batched.model[1].step_running_mean
    assert stats.abs().sum() > 0
    if policy == "per_step":
        assert not torch.allclose(stats[0], stats[-1])
    batched.eval()
    looped.eval()
    torch.testing.assert_close(batched(xs, ys, xq, yq)[1], looped(xs, ys, xq, yq)[1])


@pytest.mark.parametrize("policy", ["per_step", "running"])
def test_running_stats_are_updated_only_during_meta_training(policy):
    maml, make_input = conv_bn_maml(policy)
    xs, ys, xq, yq = episode(make_input, tasks=2)
    maml(xs, ys, xq, yq)
    trained = running_stats(maml.model)
    maml.eval()
    maml(xs, ys, xq, yq)
    for k, v in running_stats(maml.model).items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["per_step", "running"])
def test_momentum_none_is_the_plain_average_over_meta_batches(policy):
    """As nn.BatchNorm's momentum=None; each meta-batch's target read from momentum=1."""
    average, make_input = conv_bn_maml(policy)
    latest, _ = conv_bn_maml(policy)
    average.model[1].momentum, latest.model[1].momentum = None, 1.0
    targets = []
    for seed in range(3):
        xs, ys, xq, yq = episode(make_input, tasks=2, seed=seed)
        for maml in (average, latest):
            maml(xs, ys, xq, yq)
        targets.append(latest.model[1].step_running_mean.clone())
    expected = torch.stack(targets).mean(0)
    torch.testing.assert_close(average.model[1].step_running_mean, expected)
    assert not torch.allclose(targets[0], targets[-1])  # the meta-batches differ


@pytest.mark.parametrize("policy", ["per_step", "running"])
def test_adapt_in_training_mode_cannot_train_running_stats_and_says_so(policy):
    maml, make_input = conv_bn_maml(policy)
    xs, ys, xq, yq = episode(make_input, tasks=2)
    with pytest.raises(ValueError, match=r"maml.adapt\(\) in training mode .*meta_backward"):
        maml.adapt(xs, ys)
    maml(xs, ys, xq, yq)  # meta-training through MAML trains the statistics
    maml.eval()
    fast = maml.adapt(xs, ys)  # meta-test adaptation is fine
    assert fast["0.weight"].shape[0] == 2


@pytest.mark.parametrize("policy", ["transductive", "per_step", "running"])
@pytest.mark.parametrize("training", [True, False])
def test_no_statistics_leak_from_one_task_into_another(policy, training):
    maml, make_input = conv_bn_maml(policy)
    xs, ys, xq, yq = episode(make_input, tasks=3)
    if not training:
        maml(xs, ys, xq, yq)  # train the running statistics once
        maml.eval()
    _, out = maml(xs, ys, xq, yq)
    xs2, xq2 = xs.clone(), xq.clone()
    xs2[1:] = 10 * xs2[1:] + 3  # change every task but the first
    xq2[1:] = -xq2[1:]
    _, out2 = maml(xs2, ys, xq2, yq)
    torch.testing.assert_close(out2[0], out[0])


def test_per_step_eval_uses_the_set_of_each_step():
    maml, make_input = conv_bn_maml("per_step", steps=2)
    xs, ys, xq, yq = episode(make_input, tasks=2)
    maml(xs, ys, xq, yq)
    maml.eval()
    bn = maml.model[1]
    _, out = maml(xs, ys, xq, yq)
    with torch.no_grad():
        bn.step_running_mean[-1] += 1.0  # the query set's statistics only
    _, shifted = maml(xs, ys, xq, yq)
    assert not torch.allclose(out, shifted)


def test_higher_never_updates_the_models_running_stats():
    """Why eval mode after higher-based meta-training gives near-chance accuracy."""
    plain, _, make_input = twins("conv-batchnorm2d")
    xs, ys, _, _ = episode(make_input, tasks=1)
    before = running_stats(plain)
    inner = torch.optim.SGD(plain.parameters(), lr=0.3)
    with higher.innerloop_ctx(plain, inner, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(F.cross_entropy(fmodel(xs[0]), ys[0]))
        fmodel(xs[0]).sum().backward()
    for k, v in running_stats(plain).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_eval_mode_batchnorm_with_untrained_stats_at_meta_training_is_an_error():
    maml, make_input = conv_bn_maml("running")
    xs, ys, xq, yq = episode(make_input, tasks=2)
    maml.model.eval()  # the mistake: the model, not the MAML wrapper, in eval mode
    with pytest.raises(ValueError, match=r"eval mode during meta-training.*never trained"):
        maml(xs, ys, xq, yq)


def test_foreign_batchnorm_needs_an_explicit_choice():
    model = mm.MetaSequential(mm.MetaLinear(3, 4), nn.BatchNorm1d(4), mm.MetaLinear(4, 2))
    with pytest.raises(ValueError, match="BatchNorm1d.*metafy.*bn=None"):
        mamlext.MAML(model)
    mamlext.MAML(model, bn=None, batched=False)


def test_the_policy_changes_through_its_owner_and_maml_follows():
    """bn_policy.set(None): nn.BatchNorm's eval, the (never trained) running statistics."""
    plain, meta, make_input = twins("conv-batchnorm2d")
    maml = mamlext.MAML(meta, step_size=0.3, bn="transductive").to(F64)
    xs, ys, xq, yq = episode(make_input, tasks=2)
    maml.eval()
    plain.eval()
    maml.bn_policy.set(None)
    assert maml.bn is None
    _, out = maml(xs, ys, xq, yq, num_steps=0)
    for t in range(2):
        torch.testing.assert_close(out[t], plain(xq[t]))  # normalised with mean 0, variance 1
    maml.bn_policy.set("transductive")
    plain.train()  # batch statistics, as transductive
    _, out = maml(xs, ys, xq, yq, num_steps=0)
    for t in range(2):
        torch.testing.assert_close(out[t], plain(xq[t]))
    with pytest.raises(ValueError, match=r"bn must be one of .*got 'per-step'"):
        maml.bn_policy.set("per-step")


def test_per_step_needs_layers_that_track_running_stats():
    model = mm.MetaSequential(mm.MetaLinear(3, 4), mm.MetaBatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"'1'.*'per_step' needs track_running_stats=True"):
        mamlext.MAML(model, bn="per_step")
    assert model[1].norm_settings is None  # a refused policy changes no layer


# ---- checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bn,mode", [("per_step", "per_layer_per_step"), ("running", "per_element")]
)
def test_a_state_dict_with_the_names_and_shapes_of_earlier_checkpoints_loads(bn, mode):
    """``mamlext train`` checkpoints: the names and shapes before BatchNormPolicy/StepSizes.

    Built by hand: the plain model's entries under ``model.``, two ``[rows, C]`` sets per
    BatchNorm (``per_step``: one per inner step, then the query's; ``running``: one), and
    rate ``i`` of parameter ``i`` as ``step_sizes.i``. The meta-test then follows a by-hand
    reference that reads each entry in its role.
    """
    steps, tasks = 2, 2
    plain, meta, make_input = twins("conv-batchnorm2d")
    maml = mamlext.MAML(meta, step_size=0.3, num_steps=steps, bn=bn, step_size_mode=mode)
    maml.to(F64)
    gen = torch.Generator().manual_seed(5)

    def positive(*shape):
        return 0.5 + torch.rand(*shape, generator=gen, dtype=F64)

    state = {}
    for key, value in plain.state_dict().items():
        state[f"model.{key}"] = torch.tensor(7) if "tracked" in key else positive(value.shape)
    rows = steps + 1 if bn == "per_step" else 1
    norms = [key[: -len(".running_mean")] for key in plain.state_dict() if "running_mean" in key]
    for layer in norms:
        channels = state[f"model.{layer}.running_mean"].shape[0]
        state[f"model.{layer}.step_running_mean"] = positive(rows, channels) - 1
        state[f"model.{layer}.step_running_var"] = positive(rows, channels)
    names = [n for n, _ in plain.named_parameters()]
    for i, name in enumerate(names):
        shape = (steps,) if mode == "per_layer_per_step" else state[f"model.{name}"].shape
        state[f"step_sizes.{i}"] = positive(*shape) / 5
    maml.load_state_dict(state)  # strict: no name missing or left over

    def stats(row):
        return {
            f"{layer}.{kind}": state[f"model.{layer}.step_{kind}"][row]
            for layer in norms
            for kind in ("running_mean", "running_var")
        }

    def rate(i, step):
        rates = state[f"step_sizes.{i}"]
        return rates[step] if mode == "per_layer_per_step" else rates

    plain.eval()  # BatchNorm with the statistics handed in
    xs, ys, xq, yq = episode(make_input, tasks=tasks)
    want = []
    for t in range(tasks):
        fast = {n: state[f"model.{n}"].clone().requires_grad_() for n in names}
        for step in range(steps):
            out = torch.func.functional_call(plain, {**fast, **stats(min(step, rows - 1))}, xs[t])
            grads = torch.autograd.grad(F.cross_entropy(out, ys[t]), list(fast.values()))
            fast = {n: fast[n] - rate(i, step) * g for i, (n, g) in enumerate(zip(names, grads))}
        want.append(torch.func.functional_call(plain, {**fast, **stats(rows - 1)}, xq[t]))
    maml.eval()
    _, out = maml(xs, ys, xq, yq)
    torch.testing.assert_close(out, torch.stack(want).detach(), rtol=1e-10, atol=1e-10)


def test_dropout_draws_a_mask_per_task_in_the_batched_path():
    model = mm.MetaSequential(mm.MetaLinear(4, 64), nn.Dropout(0.5))
    params = {n: p.expand(3, *p.shape) for n, p in model.meta_named_parameters()}
    out = model(torch.ones(3, 2, 4), params=params)
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])
    zero_fraction = (out == 0).double().mean().item()
    assert 0.4 < zero_fraction < 0.6


# ---- what the other libraries do (docs/train_eval.md, "Questions users ask") -------------------


def higher_meta_loss(plain, xs, ys, xq, yq, **innerloop):
    inner = torch.optim.SGD(plain.parameters(), lr=0.3)
    with higher.innerloop_ctx(plain, inner, **innerloop) as (fmodel, diffopt):
        diffopt.step(F.cross_entropy(fmodel(xs[0]), ys[0]))
        return F.cross_entropy(fmodel(xq[0]), yq[0]), list(fmodel.parameters())


def test_higher_with_its_default_copy_initial_weights_gives_the_model_no_meta_gradient():
    """higher#30/#54: ``copy_initial_weights=True`` (the default) starts from a detached copy."""
    plain, _, make_input = twins("conv-batchnorm2d")
    xs, ys, xq, yq = episode(make_input, tasks=1)
    higher_meta_loss(plain, xs, ys, xq, yq)[0].backward()
    assert all(p.grad is None for p in plain.parameters())
    higher_meta_loss(plain, xs, ys, xq, yq, copy_initial_weights=False)[0].backward()
    assert all(p.grad is not None for p in plain.parameters())


def test_higher_without_track_higher_grads_adapts_to_the_same_weights_without_a_graph():
    """Meta-test with ``track_higher_grads=False``: same fast weights, no graph kept."""
    plain, _, make_input = twins("conv-batchnorm2d")
    xs, ys, xq, yq = episode(make_input, tasks=1)
    _, tracked = higher_meta_loss(plain, xs, ys, xq, yq, copy_initial_weights=False)
    _, untracked = higher_meta_loss(plain, xs, ys, xq, yq, track_higher_grads=False)
    for a, b in zip(tracked, untracked):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert a.grad_fn is not None and b.grad_fn is None


def test_higher_copies_the_models_train_or_eval_mode_when_it_patches():
    plain, _, _ = twins("conv-batchnorm2d")
    plain.eval()
    inner = torch.optim.SGD(plain.parameters(), lr=0.3)
    with higher.innerloop_ctx(plain, inner) as (fmodel, _):
        assert not fmodel.training and not fmodel[1].training


def test_momentum_one_keeps_the_last_training_batchs_statistics_and_eval_uses_them():
    """torchmeta's and higher's Omniglot examples build BatchNorm with momentum=1.0."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=1.0).to(F64)
    x, last, probe = (torch.randn(6, 3, 4, 4, dtype=F64) * s for s in (1, 3, 1))
    bn(x)
    bn(last)
    torch.testing.assert_close(bn.running_mean, last.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, last.var((0, 2, 3), unbiased=True))
    bn.eval()
    before = bn(probe)
    bn.train()
    bn(x)  # another last batch: the same probe is now normalised differently
    bn.eval()
    assert (bn(probe) - before).abs().max() > 0.1


def test_track_running_stats_false_is_transductive_only_when_set_at_construction():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=F64) * 2 + 1
    built = nn.BatchNorm2d(3, track_running_stats=False).to(F64)
    assert built.running_mean is None
    torch.testing.assert_close(built.eval()(x), built.train()(x), rtol=0, atol=0)
    switched = nn.BatchNorm2d(3).to(F64)
    switched.track_running_stats = False  # the buffers stay: eval mode still reads them
    assert not torch.allclose(switched.eval()(x), switched.train()(x))


def test_vmap_refuses_batchnorm_that_updates_running_statistics():
    """torch.func's batch-norm page: vmap cannot update running statistics in place."""
    plain, _, make_input = twins("conv-batchnorm2d")
    params = dict(plain.named_parameters())
    xs = make_input(2, 4)
    with pytest.raises(RuntimeError, match="updated in place"):
        torch.func.vmap(lambda x: torch.func.functional_call(plain, params, (x,)))(xs)
    torch.func.replace_all_batch_norm_modules_(plain)  # no running statistics: transductive
    assert plain[1].running_mean is None
    torch.func.vmap(lambda x: torch.func.functional_call(plain, params, (x,)))(xs)


def test_per_step_statistics_survive_an_evaluation_between_meta_training_steps():
    """MAML++'s reference backs its statistics up with a copy that shares their memory, so
    a validation pass overwrites them (HowToTrainYourMAMLPytorch#42). mamlext's per_step
    statistics change only when a meta-training step commits, so a run with evaluations in
    between equals one without."""
    runs = []
    for evaluate_between in (False, True):
        maml, make_input = conv_bn_maml("per_step")
        xs, ys, xq, yq = episode(make_input, tasks=2)
        maml(xs, ys, xq, yq)
        before = running_stats(maml.model)
        if evaluate_between:
            maml.eval()
            with torch.no_grad():
                maml(*episode(make_input, tasks=2, seed=9))
            for k, v in running_stats(maml.model).items():
                torch.testing.assert_close(v, before[k], rtol=0, atol=0)
            maml.train()
        maml(*episode(make_input, tasks=2, seed=10))
        runs.append(running_stats(maml.model))
    for k, v in runs[1].items():
        torch.testing.assert_close(v, runs[0][k], rtol=0, atol=0)
