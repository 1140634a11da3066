"""mamlext.inner: the errors of gradient_update_parameters and inner_gradients, and the
advice they give, followed."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

import mamlext
from mamlext import modules as mm
from mamlext.inner import InnerGradientError, UnusedParameterError


class HeadAndSpare(mm.MetaModule):
    """A linear head the loss uses and a spare one it does not."""

    def __init__(self) -> None:
        super().__init__()
        self.head = mm.MetaLinear(3, 2)
        self.spare = mm.MetaLinear(3, 2)

    def forward(self, x, params=None):
        return self.head(x, params=self.get_subdict(params, "head"))


def setup():
    torch.manual_seed(0)
    return HeadAndSpare().double(), torch.randn(6, 3, dtype=torch.float64), torch.arange(6) % 2


def test_unused_parameters_raise_what_torchmeta_and_mamlext_raised():
    model, x, y = setup()
    loss = F.cross_entropy(model(x), y)
    for expected in (RuntimeError, ValueError):  # torchmeta's (autograd's), mamlext's
        with pytest.raises(expected, match=r"\['spare.weight', 'spare.bias'\].*params="):
            mamlext.gradient_update_parameters(model, loss)
    with pytest.raises(UnusedParameterError):
        mamlext.gradient_update_parameters(model, loss)


def test_the_advice_for_unused_parameters_works():
    """Adapt only the used parameters (params=) and merge into the full dict."""
    model, x, y = setup()
    loss = F.cross_entropy(model(x), y)
    full = OrderedDict(model.meta_named_parameters())
    used = OrderedDict((n, p) for n, p in full.items() if n.startswith("head."))
    updated = mamlext.gradient_update_parameters(model, loss, params=used, step_size=0.3)
    merged = OrderedDict({**full, **updated})

    grads = torch.autograd.grad(loss, list(used.values()))
    for (name, p), g in zip(used.items(), grads):
        torch.testing.assert_close(merged[name], p - 0.3 * g, rtol=0, atol=1e-15)
    assert merged["spare.weight"] is full["spare.weight"]
    query = F.cross_entropy(model(x, params=merged), y)
    assert query.item() < loss.item()


def test_a_loss_without_graph_raises_what_torchmeta_and_mamlext_raised():
    model, x, y = setup()
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y)
    for expected in (RuntimeError, ValueError):
        with pytest.raises(expected, match="no graph"):
            mamlext.gradient_update_parameters(model, loss)
    with pytest.raises(InnerGradientError):
        mamlext.gradient_update_parameters(model, loss)


def test_maml_allow_unused_leaves_unused_parameters_unchanged():
    model, x, y = setup()
    xs, ys = x[None], y[None]
    with pytest.raises(UnusedParameterError, match="allow_unused=True"):
        mamlext.MAML(model, step_size=0.3, batched=False).adapt(xs, ys)

    adapted = mamlext.MAML(model, step_size=0.3, batched=False, allow_unused=True).adapt(xs, ys)
    head = [model.head.weight, model.head.bias]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), head)
    torch.testing.assert_close(adapted["head.weight"][0], head[0] - 0.3 * grads[0])
    torch.testing.assert_close(adapted["head.bias"][0], head[1] - 0.3 * grads[1])
    assert torch.equal(adapted["spare.weight"][0], model.spare.weight)
    assert torch.equal(adapted["spare.bias"][0], model.spare.bias)
