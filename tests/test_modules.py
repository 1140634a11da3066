"""Task-batched layers equal the per-task loop; torchmeta's params= conventions."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mamlext import modules as mm
from mamlext.modules import layers
from tests.models import F64

T, N = 3, 2


def per_task_params(module, scale=0.1):
    return OrderedDict(
        (name, p.detach().expand(T, *p.shape) + scale * torch.randn(T, *p.shape, dtype=p.dtype))
        for name, p in module.meta_named_parameters()
    )


def check_batched_equals_loop(module, x):
    params = per_task_params(module)
    for p in params.values():
        p.requires_grad_()
    batched = module(x, params=params)
    looped = torch.stack(
        [module(x[t], params={k: v[t] for k, v in params.items()}) for t in range(T)]
    )
    torch.testing.assert_close(batched, looped)
    g_batched = torch.autograd.grad(batched.pow(2).sum(), list(params.values()))
    g_looped = torch.autograd.grad(looped.pow(2).sum(), list(params.values()))
    torch.testing.assert_close(g_batched, g_looped)


# name: (make, input shape, the path _MetaConvNd must take on the CPU): "im2col" (unfold +
# batched matmul, 2-d convolutions with few inputs per output) or "grouped" (one convolution
# with the tasks as channel groups).
CONVS = {
    "conv2d first layer": (lambda: mm.MetaConv2d(1, 4, 3, padding=1), (1, 6, 6), "im2col"),
    "conv2d strided dilated": (
        lambda: mm.MetaConv2d(2, 4, 3, stride=2, dilation=2, padding=2),
        (2, 9, 9),
        "im2col",
    ),
    "conv2d reflect padding": (
        lambda: mm.MetaConv2d(1, 3, 3, padding=1, padding_mode="reflect"),
        (1, 5, 5),
        "im2col",
    ),
    "conv2d many channels": (lambda: mm.MetaConv2d(8, 4, 3, padding=1), (8, 5, 5), "grouped"),
    "conv2d reflect padding, many channels": (
        lambda: mm.MetaConv2d(8, 4, 3, padding=1, padding_mode="reflect"),
        (8, 5, 5),
        "grouped",
    ),
    "conv2d groups": (lambda: mm.MetaConv2d(4, 6, 3, groups=2), (4, 5, 5), "grouped"),
    "conv2d padding same": (lambda: mm.MetaConv2d(1, 2, 3, padding="same"), (1, 5, 5), "grouped"),
    "conv2d no bias": (lambda: mm.MetaConv2d(1, 2, 2, bias=False), (1, 4, 4), "im2col"),
    "conv1d": (lambda: mm.MetaConv1d(2, 3, 3, padding=1), (2, 7), "grouped"),
    "conv3d": (lambda: mm.MetaConv3d(1, 2, 2), (1, 3, 3, 3), "grouped"),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_batched_conv_equals_loop(name):
    make, shape, _ = CONVS[name]
    torch.manual_seed(0)
    check_batched_equals_loop(make().to(F64), torch.randn(T, N, *shape, dtype=F64))


def record_conv_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Spy on what the layers call: ``("conv", groups)``, ``("unfold",)`` or ``("bmm",)``."""
    calls = []

    def spy(record, function):
        def wrapper(*args, **kwargs):
            calls.append(record(*args, **kwargs))
            return function(*args, **kwargs)

        return wrapper

    for dims, conv in list(
        layers._CONV.items()
    ):  # conv(x, w, b, stride, padding, dilation, groups)
        monkeypatch.setitem(layers._CONV, dims, spy(lambda *a: ("conv", a[6]), conv))
    monkeypatch.setattr(F, "unfold", spy(lambda *a: ("unfold",), F.unfold))
    for name in ("bmm", "baddbmm"):
        monkeypatch.setattr(torch, name, spy(lambda *a: ("bmm",), getattr(torch, name)))
    return calls


@pytest.mark.parametrize("name", list(CONVS))
def test_batched_conv_takes_the_expected_path(name, monkeypatch):
    make, shape, path = CONVS[name]
    module = make()
    params = per_task_params(module)
    with monkeypatch.context() as patch:
        calls = record_conv_calls(patch)
        module(torch.randn(T, N, *shape), params=params)
    if path == "im2col":
        assert calls == [("unfold",), ("bmm",)]
    else:  # every task's channel groups in one convolution
        assert calls == [("conv", T * module.groups)]


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: mm.MetaLinear(4, 3), (4,)),
        (lambda: mm.MetaLinear(4, 3), (5, 4)),  # extra sample dims
        (lambda: mm.MetaLayerNorm(4), (5, 4)),
        (lambda: mm.MetaGroupNorm(2, 4), (4, 3)),
        (lambda: mm.MetaBatchNorm1d(4, track_running_stats=False), (4, 3)),
    ],
)
def test_batched_layers_equal_loop(make, shape):
    torch.manual_seed(0)
    check_batched_equals_loop(make().to(F64), torch.randn(T, N, *shape, dtype=F64))


def test_bilinear_and_embedding_batched_equal_loop():
    torch.manual_seed(0)
    bil = mm.MetaBilinear(3, 2, 4).to(F64)
    params = per_task_params(bil)
    x1, x2 = torch.randn(T, N, 3, dtype=F64), torch.randn(T, N, 2, dtype=F64)
    looped = torch.stack(
        [bil(x1[t], x2[t], params={k: v[t] for k, v in params.items()}) for t in range(T)]
    )
    torch.testing.assert_close(bil(x1, x2, params=params), looped)
    emb = mm.MetaEmbedding(7, 3, padding_idx=0).to(F64)
    idx = torch.randint(0, 7, (T, N, 4))
    check = mm.MetaSequential(emb)
    check_batched_equals_loop(check, idx)


def test_missing_key_is_an_error_naming_it():
    model = mm.MetaSequential(mm.MetaLinear(3, 2), nn.ReLU(), mm.MetaLinear(2, 1))
    params = OrderedDict(model.meta_named_parameters())
    del params["2.bias"]
    with pytest.raises(KeyError, match=r"no entry 'bias' for MetaLinear"):
        model(torch.randn(4, 3), params=params)


def test_wrong_task_dimension_is_an_error():
    model = mm.MetaLinear(3, 2)
    params = {"weight": torch.randn(4, 3, 2), "bias": torch.randn(4, 2)}
    with pytest.raises(ValueError, match=r"params\['weight'\] has shape \(4, 3, 2\)"):
        model(torch.randn(4, 5, 3), params=params)
    params = {"weight": torch.randn(4, 2, 3), "bias": torch.randn(5, 2)}
    with pytest.raises(ValueError, match="disagree on the number of tasks"):
        model(torch.randn(4, 5, 3), params=params)
    good = {"weight": torch.randn(4, 2, 3), "bias": torch.randn(4, 2)}
    with pytest.raises(ValueError, match=r"task-batched input must be \[T=4, N, \.\.\.\]"):
        model(torch.randn(3, 5, 3), params=good)


def test_meta_named_parameters_and_subdict_follow_torchmeta():
    model = mm.MetaSequential(mm.MetaLinear(3, 2), nn.ReLU(), nn.Linear(2, 2), mm.MetaLinear(2, 1))
    names = [n for n, _ in model.meta_named_parameters()]
    assert names == ["0.weight", "0.bias", "3.weight", "3.bias"]  # plain nn.Linear excluded
    sub = model.get_subdict(OrderedDict(model.meta_named_parameters()), "3")
    assert list(sub) == ["weight", "bias"]
    assert model.get_subdict(None, "3") is None
    assert model.get_subdict({"0.weight": torch.zeros(1)}, "3") == OrderedDict()
