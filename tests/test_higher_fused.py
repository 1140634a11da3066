"""mamlext.higher: higher's innerloop_ctx with the fused SGD equals plain higher (float64)."""

import higher
import higher.optim
import pytest
import torch
import torch.nn.functional as F

from tests.models import F64, twins
from tests.test_maml_vs_higher import episode


def meta_gradient(plain, xs, ys, xq, yq, make_opt, steps=3):
    losses = []
    for t in range(xs.shape[0]):
        with higher.innerloop_ctx(plain, make_opt(plain), copy_initial_weights=False) as (
            fmodel,
            diffopt,
        ):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fmodel(xs[t]), ys[t]))
            losses.append(F.cross_entropy(fmodel(xq[t]), yq[t]))
    return torch.autograd.grad(torch.stack(losses).mean(), list(plain.parameters()))


OPTIMIZERS = {
    "plain": lambda m: torch.optim.SGD(m.parameters(), lr=0.3),
    "momentum+nesterov+decay": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "momentum+dampening": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.2, momentum=0.5, dampening=0.3
    ),
    "per-group lr": lambda m: torch.optim.SGD(
        [{"params": list(m.parameters())[:2], "lr": 0.1}, {"params": list(m.parameters())[2:]}],
        lr=0.3,
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_sgd_in_higher_equals_higher(name):
    plain, _, make_input = twins("conv-batchnorm2d")
    xs, ys, xq, yq = episode(make_input, tasks=2)
    make_opt = OPTIMIZERS[name]
    import mamlext.higher

    mamlext.higher.register()  # done on first import; again after the previous test undid it
    try:
        assert higher.optim._opt_mapping[torch.optim.SGD].__name__ == "FusedDifferentiableSGD"
        fused = meta_gradient(plain, xs, ys, xq, yq, make_opt)
    finally:
        higher.register_optim(torch.optim.SGD, higher.optim.DifferentiableSGD)
    reference = meta_gradient(plain, xs, ys, xq, yq, make_opt)
    for f, r in zip(fused, reference):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)
    assert fused[0].dtype == F64


def test_learned_lr_tensor_override_reaches_the_rate():
    plain, _, make_input = twins("mlp-layernorm")
    xs, ys, xq, yq = episode(make_input, tasks=1)
    lr = torch.tensor(0.3, dtype=F64, requires_grad=True)
    import mamlext.higher

    grads = []
    for register in (
        mamlext.higher.register,
        lambda: higher.register_optim(torch.optim.SGD, higher.optim.DifferentiableSGD),
    ):
        register()
        opt = torch.optim.SGD(plain.parameters(), lr=0.1)
        with higher.innerloop_ctx(
            plain, opt, copy_initial_weights=False, override={"lr": [lr]}
        ) as (fm, do):
            do.step(F.cross_entropy(fm(xs[0]), ys[0]))
            grads.append(torch.autograd.grad(F.cross_entropy(fm(xq[0]), yq[0]), lr)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    assert grads[0].abs() > 0


def test_import_registers_the_fused_sgd():
    from tests.conftest import run_python

    result = run_python(
        "import higher, higher.optim, torch, mamlext.higher\n"
        "print(higher.optim._opt_mapping[torch.optim.SGD].__name__)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "FusedDifferentiableSGD"
