"""MAML++'s pieces (Antoniou et al. 2019) against references built without mamlext.

Multi-step loss (MSL) against higher; per-step BatchNorm weights (BNWB) and more steps at
meta-test than trained against plain float64 loops; derivative-order annealing (DA)
against first-order and second-order references; the cosine rate against torch's
scheduler; resume with every piece on; the errors.
"""

import json
import math

import higher
import pytest
import torch
import torch.nn.functional as F

import mamlext
import mamlext.train.loop
from mamlext.schedules import multi_step_weights
from mamlext.train import TrainConfig, meta_lr_at, train
from mamlext.train.run_checkpoint import CheckpointError, load_checkpoint, load_run_checkpoint
from tests.conftest import SHARED_DATA
from tests.models import F64, twins
from tests.test_maml_vs_higher import TOL, episode
from tests.test_train import cli, quiet, read_metrics

OMNIGLOT = SHARED_DATA / "omniglot"
STEPS, TASKS = 3, 3
WEIGHTS = [0.25, 0.0, 0.75]  # a zero weight too: its query pass is skipped, not mis-weighted


def learned_rates(maml):
    """Move the learned rates away from their initial value, so that a mix-up would show."""
    with torch.no_grad():
        for rates in maml.step_sizes.rates:
            rates.uniform_(0.1, 0.5)
    return maml.step_sizes.rates


def msl_reference(plain, xs, ys, xq, yq, weights, rates, first_order):
    """sum_k w_k * mean_t L(query_t | after step k), per task with higher (second order) or
    by hand (first order: the inner gradients detached)."""
    params = list(plain.parameters())
    total = 0
    for t in range(xs.shape[0]):
        if first_order:
            names = [n for n, _ in plain.named_parameters()]
            fast = params
            for k, w in enumerate(weights):
                out = torch.func.functional_call(plain, dict(zip(names, fast)), (xs[t],))
                grads = torch.autograd.grad(F.cross_entropy(out, ys[t]), fast)
                fast = [p - r[k] * g.detach() for p, g, r in zip(fast, grads, rates)]
                query = torch.func.functional_call(plain, dict(zip(names, fast)), (xq[t],))
                total = total + w * F.cross_entropy(query, yq[t])
            continue
        opt = torch.optim.SGD([{"params": [p]} for p in params], lr=1.0)
        with higher.innerloop_ctx(plain, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for k, w in enumerate(weights):
                diffopt.step(
                    F.cross_entropy(fmodel(xs[t]), ys[t]), override={"lr": [r[k] for r in rates]}
                )
                total = total + w * F.cross_entropy(fmodel(xq[t]), yq[t])
    return total / xs.shape[0]


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-task"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("name", ["conv-batchnorm2d", "mlp-layernorm"])
def test_multi_step_loss_equals_the_weighted_sum_of_the_query_losses_of_higher(
    name, first_order, batched
):
    plain, meta, make_input = twins(name)
    xs, ys, xq, yq = episode(make_input, TASKS)
    maml = mamlext.MAML(
        meta, num_steps=STEPS, step_size_mode="per_layer_per_step", first_order=first_order,
        batched=batched,
    ).to(F64)  # fmt: skip
    rates = learned_rates(maml)
    want = msl_reference(plain, xs, ys, xq, yq, WEIGHTS, rates, first_order)
    loss, _ = maml(xs, ys, xq, yq, step_weights=WEIGHTS)
    torch.testing.assert_close(loss, want, **TOL)
    ours = torch.autograd.grad(loss, [*meta.parameters(), *rates])
    ref = torch.autograd.grad(want, [*plain.parameters(), *rates])
    for g, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(g, r, **TOL)


def test_meta_backward_with_the_multi_step_loss_equals_forward_and_backward():
    plain, meta, make_input = twins("conv-batchnorm2d")
    xs, ys, xq, yq = episode(make_input, TASKS)
    maml = mamlext.MAML(meta, num_steps=STEPS, step_size_mode="per_layer_per_step").to(F64)
    rates = learned_rates(maml)
    want = msl_reference(plain, xs, ys, xq, yq, WEIGHTS, rates, first_order=False)
    ref = torch.autograd.grad(want, [*plain.parameters(), *rates])
    loss, _ = maml.meta_backward(xs, ys, xq, yq, step_weights=WEIGHTS, tasks_per_pass=2)
    torch.testing.assert_close(loss, want.detach(), **TOL)
    for p, r in zip([*meta.parameters(), *rates], ref, strict=True):
        torch.testing.assert_close(p.grad, r, **TOL)


def bnwb_reference(plain, xs, ys, xq, yq, rows, lr, steps):
    """Plain-torch MAML where BatchNorm ``i`` scales and shifts with ``rows[i][k]`` at step
    ``k`` and ``rows[i][steps]`` on the query set; BatchNorm weights are not adapted."""
    norms = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    adapted = {n: p for n, p in plain.named_parameters() if n.rsplit(".", 1)[0] not in norms}

    def affine(row):
        return {f"{n}.{kind}": rows[(n, kind)][row] for n in norms for kind in ("weight", "bias")}

    losses = []
    for t in range(xs.shape[0]):
        fast = dict(adapted)
        for k in range(steps):
            out = torch.func.functional_call(plain, {**fast, **affine(k)}, (xs[t],))
            grads = torch.autograd.grad(
                F.cross_entropy(out, ys[t]), list(fast.values()), create_graph=True
            )
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
        out = torch.func.functional_call(plain, {**fast, **affine(steps)}, (xq[t],))
        losses.append(F.cross_entropy(out, yq[t]))
    return torch.stack(losses).mean(), list(adapted.values())


@pytest.mark.parametrize("inner_checkpoint", [None, 2])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-task"])
def test_per_step_batchnorm_weights_get_the_gradients_of_their_own_step(batched, inner_checkpoint):
    plain, meta, make_input = twins("conv-batchnorm2d")
    xs, ys, xq, yq = episode(make_input, TASKS)
    maml = mamlext.MAML(
        meta, step_size=0.3, num_steps=STEPS, bn_per_step_weights=True, batched=batched,
        inner_checkpoint=inner_checkpoint,
    ).to(F64)  # fmt: skip
    names = maml.bn_policy.per_step_weight_names()
    assert names == ["1.step_weight", "1.step_bias", "5.step_weight", "5.step_bias"]
    assert not set(names) & set(maml.adapted_names)  # learned in the outer loop only
    assert meta[1].weight is None and "1.weight" not in dict(meta.named_parameters())
    own = dict(meta.named_parameters())
    torch.manual_seed(3)
    with torch.no_grad():
        for n in names:
            own[n].copy_(torch.rand_like(own[n]) + 0.5)
    rows = {tuple(n.split(".step_")): own[n].detach().clone().requires_grad_() for n in names}
    want, theta = bnwb_reference(plain, xs, ys, xq, yq, rows, 0.3, STEPS)
    loss, _ = maml(xs, ys, xq, yq)
    torch.testing.assert_close(loss, want, **TOL)
    ours = torch.autograd.grad(loss, [own[n] for n in maml.adapted_names] + [own[n] for n in names])
    ref = torch.autograd.grad(want, theta + list(rows.values()))
    for g, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(g, r, **TOL)
    # each support row gets a gradient only through its own step: every row is used
    assert all(g.abs().sum(1).min() > 0 for g in ours[len(maml.adapted_names) :])


def test_more_steps_at_meta_test_reuse_the_last_trained_step_of_rates_statistics_weights():
    """Trained with 2 steps, tested with 4: steps 2 and 3 use step 1's rate, statistics and
    BatchNorm weights; the query pass its own statistics and weights (docs/train_eval.md)."""
    trained, tested = 2, 4
    plain, meta, make_input = twins("conv-batchnorm2d")
    maml = mamlext.MAML(
        meta, num_steps=trained, bn="per_step", bn_per_step_weights=True,
        step_size_mode="per_layer_per_step",
    ).to(F64)  # fmt: skip
    torch.manual_seed(4)
    with torch.no_grad():
        for name, value in maml.state_dict().items():
            if value.is_floating_point():
                small = "step_sizes" in name  # rates 0.05..0.15, the rest 0.5..1.5
                value.copy_(
                    torch.rand_like(value) * (0.1 if small else 1) + (0.05 if small else 0.5)
                )
    norms = ["1", "5"]
    state = maml.state_dict()

    def row_values(row):
        values = {}
        for n in norms:
            for kind in ("weight", "bias"):
                values[f"{n}.{kind}"] = state[f"model.{n}.step_{kind}"][row]
            for kind in ("running_mean", "running_var"):
                values[f"{n}.{kind}"] = state[f"model.{n}.step_{kind}"][row]
        return values

    adapted = list(maml.adapted_names)
    xs, ys, xq, yq = episode(make_input, TASKS)
    plain.eval()  # normalise with the statistics handed in
    want = []
    for t in range(TASKS):
        fast = {n: state[f"model.{n}"].clone().requires_grad_() for n in adapted}
        for k in range(tested):
            row = min(k, trained - 1)
            out = torch.func.functional_call(plain, {**fast, **row_values(row)}, (xs[t],))
            grads = torch.autograd.grad(F.cross_entropy(out, ys[t]), list(fast.values()))
            rates = [state[f"step_sizes.{i}"][row] for i in range(len(adapted))]
            fast = {n: fast[n] - r * g for n, r, g in zip(adapted, rates, grads)}
        want.append(torch.func.functional_call(plain, {**fast, **row_values(trained)}, (xq[t],)))
    maml.eval()
    for batched in (True, False):
        maml.batched = batched
        _, out = maml(xs, ys, xq, yq, num_steps=tested)
        torch.testing.assert_close(out, torch.stack(want).detach(), **TOL)


def test_every_piece_task_batched_equals_per_task():
    _, meta, make_input = twins("conv-batchnorm2d")
    xs, ys, xq, yq = episode(make_input, TASKS)
    results = []
    for batched in (True, False):
        maml = mamlext.MAML(
            meta, num_steps=STEPS, bn="per_step", bn_per_step_weights=True,
            step_size_mode="per_layer_per_step", batched=batched,
        ).to(F64)  # fmt: skip
        torch.manual_seed(0)
        learned_rates(maml)
        loss, _ = maml(xs, ys, xq, yq, step_weights=WEIGHTS)
        grads = torch.autograd.grad(loss, list(maml.parameters()))
        results.append((loss, grads, [t.clone() for t in maml.bn_policy.statistics()]))
        meta = twins("conv-batchnorm2d")[1]  # fresh statistics for the second path
    (la, ga, sa), (lb, gb, sb) = results
    torch.testing.assert_close(la, lb, **TOL)
    for a, b in zip(ga + tuple(sa), gb + tuple(sb), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_the_multi_step_loss_records_the_query_statistics_of_the_last_pass_only():
    """With bn="per_step", the query set's running statistics move towards the statistics
    of the final query pass, whatever the earlier passes of the multi-step loss saw."""
    _, meta, make_input = twins("conv-batchnorm2d")
    xs, ys, xq, yq = episode(make_input, TASKS)
    maml = mamlext.MAML(meta, num_steps=STEPS, bn="per_step").to(F64)
    layer = meta[1]
    seen = []
    hook = layer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    maml(xs, ys, xq, yq, step_weights=[0.3, 0.3, 0.4])
    hook.remove()
    # per task (batched: one call for all): 3 support passes, 2 extra query passes, the query
    assert len(seen) == STEPS + (STEPS - 1) + 1
    final = seen[-1]  # [T, N, C, H, W]
    count = final[0].numel() // final.shape[2]
    mean = final.mean((0, 1, 3, 4))
    var = (final.var((1, 3, 4), unbiased=False) * count / (count - 1)).mean(0)
    momentum = layer.momentum
    torch.testing.assert_close(layer.step_running_mean[STEPS], momentum * mean, **TOL)
    torch.testing.assert_close(
        layer.step_running_var[STEPS], (1 - momentum) + momentum * var, **TOL
    )


def test_derivative_order_can_change_between_calls_of_one_maml():
    """first_order=True gives FOMAML's meta-gradient, then False second order (higher)."""
    plain, meta, make_input = twins("mlp-layernorm")
    xs, ys, xq, yq = episode(make_input, TASKS)
    maml = mamlext.MAML(meta, step_size=0.3, num_steps=2, first_order=True).to(F64)
    rates = [[0.3, 0.3]] * len(list(plain.parameters()))
    for first_order in (True, False, True):
        maml.first_order = first_order
        want = msl_reference(plain, xs, ys, xq, yq, [0, 1], rates, first_order)
        ref = torch.autograd.grad(want, list(plain.parameters()))
        loss, _ = maml(xs, ys, xq, yq)
        for g, r in zip(torch.autograd.grad(loss, list(meta.parameters())), ref, strict=True):
            torch.testing.assert_close(g, r, **TOL)


def test_derivative_order_annealing_first_phase_is_first_order_maml(tmp_path):
    """--first-order-until 4: the first 4 steps equal a FOMAML run's exactly (the losses
    recorded up to iteration 5 are computed before step 5); step 5 is second order."""
    options = dict(iterations=6, eval_every=6, eval_tasks=10, inner_steps=2)
    train(quiet(**options, out=str(tmp_path / "da"), first_order_until=4))
    train(quiet(**options, out=str(tmp_path / "fo"), first_order=True))
    train(quiet(**options, out=str(tmp_path / "so")))
    da, fo, so = (read_metrics(tmp_path / n) for n in ("da", "fo", "so"))
    assert [r["loss"] for r in da[:5]] == [r["loss"] for r in fo[:5]]
    assert da[5]["loss"] != fo[5]["loss"] and da[1]["loss"] != so[1]["loss"]
    assert mamlext.train.first_order_at(TrainConfig(first_order_until=4).resolved(), 4) is False


def test_cosine_meta_lr_equals_torch_cosine_annealing():
    config = TrainConfig(meta_lr=0.3, meta_lr_schedule="cosine", meta_lr_min=1e-3, iterations=50)
    config = config.resolved()
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50, eta_min=1e-3)
    for iteration in range(50):
        assert math.isclose(meta_lr_at(config, iteration), optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()


def test_multi_step_weights_follow_the_papers_schedule():
    """Uniform at the start, the final step gaining what the others lose (the weights sum to
    1), the others floored at floor / K, then off; K = 5, 10 epochs of 500 iterations."""
    assert multi_step_weights(5, 0, 5000) == pytest.approx([0.2] * 5)
    # after 5 of 10 epochs: earlier (1 - 0.5) / 5 = 0.1, last (1 + 4 * 0.5) / 5 = 0.6
    assert multi_step_weights(5, 2500, 5000) == pytest.approx([0.1] * 4 + [0.6])
    # near the end, at the floor: 0.03 / 5 = 0.006 each, the last 1 - 4 * 0.006 = 0.976
    assert multi_step_weights(5, 4999, 5000) == pytest.approx([0.006] * 4 + [0.976])
    for iteration in range(0, 5000, 250):
        assert sum(multi_step_weights(5, iteration, 5000)) == pytest.approx(1)
    assert multi_step_weights(5, 5000, 5000) is None
    assert multi_step_weights(1, 0, 10) == [1.0]


def train_interrupted_after(config: TrainConfig, iteration: int) -> None:
    """Meta-train ``config`` and stop it (Ctrl-C) in the step after ``iteration``, whose
    checkpoint stays: ``iteration`` must be a multiple of ``eval_every``."""
    step = mamlext.train.loop.meta_step

    def interrupted(run, i):
        if i == iteration + 1:
            raise KeyboardInterrupt
        return step(run, i)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mamlext.train.loop, "meta_step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(config)


@pytest.mark.skipif(not OMNIGLOT.exists(), reason=f"no Omniglot at {OMNIGLOT}")
def test_resume_with_every_piece_on_reproduces_the_uninterrupted_run(tmp_path):
    options = dict(
        dataset="omniglot", data_root=str(OMNIGLOT), algorithm="mamlpp", ways=3, meta_batch=2,
        inner_steps=2, test_steps=2, iterations=6, eval_every=3, multi_step_loss=4,
        first_order_until=2, periodic_eval_tasks=4, eval_tasks=4, schedule_epoch=2,
    )  # fmt: skip
    whole = train(quiet(**options, out=str(tmp_path / "whole")))["config"]
    assert (whole["bn"], whole["bn_per_step_weights"], whole["meta_lr_schedule"]) == (
        "transductive", True, "cosine",
    )  # fmt: skip
    train_interrupted_after(quiet(**options, out=str(tmp_path / "part")), 3)
    train(quiet(**options, out=str(tmp_path / "part"), resume=True))
    assert read_metrics(tmp_path / "part") == read_metrics(tmp_path / "whole")
    final = [json.loads((tmp_path / n / "final.json").read_text()) for n in ("whole", "part")]
    assert final[0]["final"] == final[1]["final"]


@pytest.mark.skipif(not OMNIGLOT.exists(), reason=f"no Omniglot at {OMNIGLOT}")
def test_a_mamlpp_run_from_before_the_authors_semantics_resumes_as_it_was(tmp_path):
    """A checkpoint written before ``bn_query_row`` and ``schedule_epoch`` existed: a query row
    of its own, schedules every iteration, the MAML paper's Conv-4."""
    earlier = dict(bn_query_row="own", schedule_epoch=1, model="mamlext.models:conv4")
    options = dict(
        dataset="omniglot", data_root=str(OMNIGLOT), algorithm="mamlpp", ways=3, meta_batch=2,
        inner_steps=2, test_steps=2, iterations=4, eval_every=2, periodic_eval_tasks=2,
        eval_tasks=2, out=str(tmp_path),
    )  # fmt: skip
    train_interrupted_after(quiet(**options, **earlier), 2)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    for key in ("bn_query_row", "schedule_epoch"):
        del state["config"][key]
    state["config"]["model"] = None
    torch.save(state, path)
    _, config = load_run_checkpoint(path)
    assert (config.bn_query_row, config.schedule_epoch, config.model) == tuple(earlier.values())
    with pytest.raises(CheckpointError, match="bn_query_row: checkpoint 'own' vs now 'last_step'"):
        train(quiet(**options, resume=True))
    train(quiet(**options, **earlier, resume=True))
    assert load_checkpoint(path)["iteration"] == 4


def test_step_weights_errors_name_the_problem():
    _, meta, make_input = twins("mlp-layernorm")
    xs, ys, xq, yq = episode(make_input, TASKS)
    maml = mamlext.MAML(meta, num_steps=2).to(F64)
    with pytest.raises(ValueError, match="has 3 weight.*this call takes 2 step"):
        maml(xs, ys, xq, yq, step_weights=[0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="finite and >= 0"):
        maml(xs, ys, xq, yq, step_weights=[-0.5, 1.5])
    with pytest.raises(ValueError, match="at least one inner step"):
        maml(xs, ys, xq, yq, num_steps=0, step_weights=[])
    maml.inner_checkpoint = 1
    with pytest.raises(ValueError, match="inner_checkpoint does not keep"):
        maml(xs, ys, xq, yq, step_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="need a mamlext Meta BatchNorm layer"):
        mamlext.MAML(twins("mlp-layernorm")[1], bn_per_step_weights=True)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--multi-step-loss", "5000", "--iterations", "100"], "--multi-step-loss 5000 must be"),
        (["--multi-step-loss", "10", "--multi-step-loss-floor", "-1"], "floor must be in [0, 1]"),
        (["--bn-per-step-weights"], "need a mamlext Meta BatchNorm layer"),
        (["--meta-lr-schedule", "linear"], "unknown --meta-lr-schedule 'linear'"),
        (["--meta-lr-schedule", "cosine", "--meta-lr-milestones", "5"], "milestones only"),
        (["--first-order-until", "-1"], "--first-order-until must be >= 0"),
        (["--schedule-epoch", "0"], "--schedule-epoch must be >= 1"),
        (["--multi-step-loss", "5", "--inner-checkpoint", "1"], "use one or the other"),
    ],
)
def test_bad_mamlpp_settings_are_one_clear_line(tmp_path, args, message):
    result = cli("train", *args, "--out", str(tmp_path), "--no-progress")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
