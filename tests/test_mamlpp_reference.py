"""MAML++ as its authors' code computes it (AntreasAntoniou/HowToTrainYourMAMLPytorch).

``authors_meta_loss`` is a float64 loop written from what their code does (docs/mamlpp.md
lists each behaviour with its file and line): per task, inner step ``k`` on the support set
with BatchNorm row ``k`` (batch statistics, the row's weight and bias) and rate ``k`` of each
tensor; with the multi-step loss (epochs 0-9) the query after step ``k`` on row ``k``,
weighted, else the query after the last step on the last row; the mean over tasks. mamlext's
``--algorithm mamlpp`` must give the same loss and meta-gradients (weights, rates, BatchNorm
rows) with rates and rows away from their initial values, and the same schedules at epoch
boundaries. A last test runs the authors' own code as the oracle where it is present.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import mamlext
from mamlext.models import mamlpp_conv4
from mamlext.train import TrainConfig, build_maml, meta_lr_at, step_weights_at

F64 = torch.float64
STEPS, EPOCHS_OF_MSL, WAYS = 5, 10, 5


def authors_weights(epoch: int) -> list[float]:
    """The per-step loss weights of their ``get_per_step_loss_importance_vector``."""
    n, decay, floor = STEPS, 1.0 / (STEPS * EPOCHS_OF_MSL), 0.03 / STEPS
    earlier = max(1.0 / n - epoch * decay, floor)
    last = min(1.0 / n + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor)
    return [earlier] * (n - 1) + [last]


def authors_forward(x, fast, gammas, betas, row):
    """Their VGGReLUNormNetwork: conv, batch-statistics BatchNorm on ``row``, LeakyReLU,
    max-pool, four times; then the linear layer."""
    h = x
    for block in range(4):
        h = F.conv2d(h, fast[2 * block], fast[2 * block + 1], padding=1)
        mean = h.mean((0, 2, 3), keepdim=True)
        var = h.var((0, 2, 3), unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5)
        h = h * gammas[block][row].view(1, -1, 1, 1) + betas[block][row].view(1, -1, 1, 1)
        h = F.max_pool2d(F.leaky_relu(h, 0.01), 2)
    return F.linear(h.flatten(1), fast[8], fast[9])


def authors_meta_loss(weights, rates, gammas, betas, xs, ys, xq, yq, epoch, second_order):
    losses = []
    multi_step = epoch < EPOCHS_OF_MSL
    for t in range(xs.shape[0]):
        fast, terms = list(weights), []
        for k in range(STEPS):
            support = F.cross_entropy(authors_forward(xs[t], fast, gammas, betas, k), ys[t])
            grads = torch.autograd.grad(support, fast, create_graph=second_order)
            fast = [w - r[k] * g for w, r, g in zip(fast, rates, grads)]
            if multi_step or k == STEPS - 1:
                query = F.cross_entropy(authors_forward(xq[t], fast, gammas, betas, k), yq[t])
                terms.append(authors_weights(epoch)[k] * query if multi_step else query)
        losses.append(sum(terms))
    return torch.stack(losses).mean()


def preset(iterations: int | None = None) -> TrainConfig:
    return TrainConfig(
        dataset="omniglot", data_root="unused", algorithm="mamlpp", iterations=iterations
    ).resolved()


def mamlpp(batched: bool, first_order: bool = False, hidden: int = 4, seed: int = 0):
    """mamlext's MAML++ as the preset builds it, with learned values moved off their start."""
    torch.manual_seed(seed)
    model = mamlpp_conv4(WAYS, hidden=hidden).to(F64)
    config = preset()
    maml = mamlext.MAML(
        model, step_size=config.step_size, num_steps=config.inner_steps,
        step_size_mode="per_layer_per_step", bn=config.bn,
        bn_per_step_weights=config.bn_per_step_weights, bn_query_row=config.bn_query_row,
        batched=batched, first_order=first_order,
    ).to(F64)  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for rate in maml.step_sizes.rates:
            rate.copy_(0.05 + 0.1 * torch.rand(rate.shape, generator=g, dtype=F64))
        for name in maml.bn_policy.per_step_weight_names():
            p = model.get_parameter(name)
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
    return maml, model


def episode(tasks=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(tasks, WAYS, 1, 28, 28, generator=g, dtype=F64).round()  # binary, as theirs
    xq = torch.rand(tasks, WAYS, 1, 28, 28, generator=g, dtype=F64).round()
    ys = torch.stack([torch.randperm(WAYS, generator=g) for _ in range(tasks)])
    yq = torch.stack([torch.randperm(WAYS, generator=g) for _ in range(tasks)])
    return xs, ys, xq, yq


def their_view(maml, model):
    """mamlext's parameters in the authors' roles (the same tensors)."""
    weights = [maml.model.get_parameter(n) for n in maml.adapted_names]
    bn = [model[4 * block + 1] for block in range(4)]
    return weights, maml.step_sizes.rates, [b.step_weight for b in bn], [b.step_bias for b in bn]


@pytest.mark.parametrize("batched", [True, False], ids=["all tasks at once", "per task"])
@pytest.mark.parametrize(
    "epoch,first_order", [(0, False), (3, False), (9, True), (10, False)],
    ids=["epoch 0", "epoch 3", "epoch 9 first order", "epoch 10 (no multi-step loss)"],
)  # fmt: skip
def test_mamlpp_equals_the_authors_computation(batched, epoch, first_order):
    maml, model = mamlpp(batched, first_order)
    xs, ys, xq, yq = episode()
    weights = step_weights_at(preset(), epoch * 500)
    loss, _ = maml(xs, ys, xq, yq, step_weights=weights)
    mine = [t for group in their_view(maml, model) for t in group]
    reference = authors_meta_loss(
        *their_view(maml, model), xs, ys, xq, yq, epoch, second_order=not first_order
    )
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad(loss, mine)
    expected = torch.autograd.grad(reference, mine)
    scale = torch.cat([g.flatten() for g in expected]).norm()
    for got, want in zip(grads, expected):  # relative to the whole gradient
        assert (got - want).norm() <= 1e-10 * scale, (got - want).norm() / scale


@pytest.mark.parametrize("steps", [2, STEPS, STEPS + 2])
def test_predict_after_adapt_uses_the_row_of_the_last_step_taken(steps):
    """``maml.predict(fast, xq, xs, num_steps)`` gives the query outputs of a meta-batch
    call with that many steps: the query on the row of the last step taken (the last trained
    row beyond the trained steps), and that row's weights are not the first row's."""
    maml, model = mamlpp(True)
    xs, ys, xq, yq = episode()
    _, outputs = maml(xs, ys, xq, yq, num_steps=steps)
    fast = maml.adapt(xs, ys, num_steps=steps)
    torch.testing.assert_close(maml.predict(fast, xq, xs, steps), outputs, rtol=0, atol=1e-13)
    other = maml.predict(fast, xq, xs, 1)  # the query on row 0
    assert (other - outputs).abs().max() > 1e-6


def test_the_schedules_move_once_per_epoch_as_the_authors():
    """Multi-step weights and the cosine rate at epoch boundaries: their closed forms of the
    integer epoch ``iteration // 500``."""
    config = preset()
    for iteration in (0, 1, 499, 500, 501, 2750, 4999, 5000, 5001, 25_000, 49_999):
        epoch = iteration // 500
        weights = step_weights_at(config, iteration)
        if epoch < EPOCHS_OF_MSL:
            assert weights == pytest.approx(authors_weights(epoch), abs=1e-15), iteration
        else:
            assert weights is None, iteration
        rate = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * epoch / 100))
        assert meta_lr_at(config, iteration) == pytest.approx(rate, rel=1e-14), iteration


def test_the_preset_is_the_authors_omniglot_configuration():
    config = preset()
    assert (config.iterations, config.schedule_epoch, config.meta_batch) == (50_000, 500, 8)
    assert (config.inner_steps, config.test_steps, config.query, config.step_size) == (
        5, 5, 1, 0.1,
    )  # fmt: skip
    assert (config.bn, config.bn_per_step_weights, config.bn_query_row) == (
        "transductive", True, "last_step",
    )  # fmt: skip
    assert (config.multi_step_loss, config.meta_lr_schedule) == (5000, "cosine")
    maml = build_maml(config)
    assert [type(m).__name__ for m in maml.model][:4] == [
        "MetaConv2d", "MetaBatchNorm2d", "LeakyReLU", "MaxPool2d",
    ]  # fmt: skip
    assert maml.model[-1].in_features == 64  # 28 -> 14 -> 7 -> 3 -> 1
    assert maml.model[1].step_weight.shape == (5, 64)  # a row per step, none for the query
    for layer in (maml.model[0], maml.model[-1]):  # Xavier-uniform weights, zero biases
        fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(layer.weight)
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert 0.95 * bound < layer.weight.abs().max() <= bound
        assert not layer.bias.any()


# ---- their code as the oracle --------------------------------------------------------------

AUTHORS = os.environ.get("MAMLPP_REFERENCE_SRC")  # a checkout of HowToTrainYourMAMLPytorch


@pytest.mark.skipif(AUTHORS is None, reason="set MAMLPP_REFERENCE_SRC to their repository")
@pytest.mark.parametrize("epoch", [0, 4, 12])
def test_against_the_authors_code(epoch):
    """Their unmodified few_shot_learning_system.py in float64 on the same weights and batch."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    sys.path.insert(0, AUTHORS)
    try:
        from few_shot_learning_system import MAMLFewShotClassifier

        args = types.SimpleNamespace(
            batch_size=2, use_cuda=False, seed=104, num_classes_per_set=WAYS,
            task_learning_rate=0.1, number_of_training_steps_per_iter=STEPS,
            number_of_evaluation_steps_per_iter=STEPS,
            learnable_per_layer_per_step_inner_loop_learning_rate=True,
            enable_inner_loop_optimizable_bn_params=False, meta_learning_rate=1e-3,
            total_epochs=100, min_learning_rate=1e-5, multi_step_loss_num_epochs=EPOCHS_OF_MSL,
            second_order=True, first_order_to_second_order_epoch=-1,
            use_multi_step_loss_optimization=True, dataset_name="omniglot_dataset",
            cnn_num_filters=4, num_stages=4, max_pooling=True, conv_padding=True,
            norm_layer="batch_norm", per_step_bn_statistics=True, learnable_bn_gamma=True,
            learnable_bn_beta=True,
        )  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):  # their code prints every parameter
            theirs = MAMLFewShotClassifier((2, 1, 28, 28), torch.device("cpu"), args)
        theirs.current_epoch = epoch  # what their run_train_iter sets before the forward
        maml, model = mamlpp(True)
        weights, rates, gammas, betas = their_view(maml, model)
        layers = theirs.classifier.layer_dict
        rate_of = theirs.inner_loop_optimizer.names_learning_rates_dict
        names = [f"conv{b}.conv.{k}" for b in range(4) for k in ("weight", "bias")]
        names += ["linear.weights", "linear.bias"]
        with torch.no_grad():
            for name, w, r in zip(names, weights, rates):
                layers.get_parameter(name).copy_(w)
                rate_of[f"layer_dict-{name.replace('.', '-')}"][:STEPS].copy_(r)
            for block in range(4):
                layers[f"conv{block}"].norm_layer.weight.copy_(gammas[block])
                layers[f"conv{block}"].norm_layer.bias.copy_(betas[block])
                # their running statistics are never read: make them absurd to show it
                layers[f"conv{block}"].norm_layer.running_mean.fill_(1e3)
        xs, ys, xq, yq = episode()
        batch = (xs.unsqueeze(2), xq.unsqueeze(2), ys.unsqueeze(2), yq.unsqueeze(2))
        with contextlib.redirect_stdout(io.StringIO()):
            losses, _ = theirs.train_forward_prop(batch, epoch=epoch)
        loss, _ = maml(xs, ys, xq, yq, step_weights=step_weights_at(preset(), epoch * 500))
        torch.testing.assert_close(loss, losses["loss"], rtol=1e-12, atol=1e-14)
        mine = [t for group in (weights, rates, gammas, betas) for t in group]
        ours = torch.autograd.grad(loss, mine)
        their_tensors = [layers.get_parameter(n) for n in names]
        their_tensors += [rate_of[f"layer_dict-{n.replace('.', '-')}"] for n in names]
        their_tensors += [layers[f"conv{b}"].norm_layer.weight for b in range(4)]
        their_tensors += [layers[f"conv{b}"].norm_layer.bias for b in range(4)]
        expected = torch.autograd.grad(losses["loss"], their_tensors)
        scale = torch.cat([g.flatten() for g in expected]).norm()
        for i, (got, want) in enumerate(zip(ours, expected)):
            if want.shape[0] == STEPS + 1 and got.shape[0] == STEPS:  # their unused last rate
                assert want[STEPS] == 0
                want = want[:STEPS]
            assert (got - want).norm() <= 1e-10 * scale, (i, (got - want).norm() / scale)
    finally:
        sys.path.remove(AUTHORS)
        torch.set_default_dtype(dtype)
