"""MetaMultiheadAttention against nn.MultiheadAttention and its own per-task loop; metafy."""

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.testing import assert_close

from mamlext.models import PLAIN_LAYERS, conv4
from mamlext.modules.attention import MetaMultiheadAttention
from mamlext.modules.container import MetaModuleDict, MetaModuleList, MetaSequential
from mamlext.modules.layers import MetaLinear
from mamlext.modules.metafy import META_EQUIVALENT, metafy
from mamlext.modules.module import MetaModule

F64 = torch.float64
E, H, T, N, L, S = 8, 2, 3, 2, 4, 5

MHA_CONFIGS = {
    "packed": {},
    "kdim-vdim": {"kdim": 3, "vdim": 5},
    "bias-kv-zero-attn": {"add_bias_kv": True, "add_zero_attn": True},
    "no-bias": {"bias": False},
}


def mha_pair(config, batch_first=False, dropout=0.0):
    """An ``nn.MultiheadAttention`` and a ``MetaMultiheadAttention`` with its weights."""
    ref = nn.MultiheadAttention(E, H, dropout, batch_first=batch_first, dtype=F64, **config)
    meta = MetaMultiheadAttention(E, H, dropout, batch_first=batch_first, dtype=F64, **config)
    meta.load_state_dict(ref.state_dict())
    return ref, meta


def mha_inputs(config, batch_first, *lead):
    """query, key, value (with leading dims ``lead``: ``(T,)`` for task-batched)."""

    def seq(length, dim):
        return torch.randn(*lead, *((N, length) if batch_first else (length, N)), dim, dtype=F64)

    return seq(L, E), seq(S, config.get("kdim", E)), seq(S, config.get("vdim", E))


def masks(kind, *lead):
    """(key_padding_mask, attn_mask): every query keeps key 0, so no row is all masked."""
    if kind == "none":
        return None, None
    padding = torch.zeros(*lead, N, S, dtype=torch.bool)
    padding[..., 0, -1] = True
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    if kind == "bool":
        return padding, causal
    if kind == "float":
        return padding.to(F64) * -1e4, torch.randn(L, S, dtype=F64)
    per_head = causal | (torch.rand(*lead, N * H, L, S) < 0.3)
    per_head[..., 0] = False
    return padding, per_head  # "3d": [N*H, L, S]; task-batched "4d": [T, N*H, L, S]


def perturbed(module, *lead, shared=()):
    """Each parameter plus noise, ``[*lead, *shape]`` except the ``shared`` ones."""
    params = OrderedDict()
    for name, p in module.named_parameters():
        noise = torch.randn(*(() if name in shared else lead), *p.shape, dtype=F64)
        params[name] = p.detach() + 0.1 * noise
    return params


CALLS = [
    {"need_weights": True, "average_attn_weights": True},
    {"need_weights": True, "average_attn_weights": False},
    {"need_weights": False},
]


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "3d"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("config", MHA_CONFIGS.values(), ids=MHA_CONFIGS.keys())
def test_mha_unbatched_matches_torch(config, batch_first, mask_kind):
    torch.manual_seed(0)
    ref, meta = mha_pair(config, batch_first)
    q, k, v = mha_inputs(config, batch_first)
    padding, attn_mask = masks(mask_kind)
    params = perturbed(meta)
    moved = nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=F64, **config)
    moved.load_state_dict(params)
    for call in CALLS:
        kwargs = dict(key_padding_mask=padding, attn_mask=attn_mask, **call)
        assert_close(meta(q, k, v, **kwargs), ref(q, k, v, **kwargs))
        assert_close(meta(q, k, v, **kwargs, params=params), moved(q, k, v, **kwargs))


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_self_attention_and_unbatched_input(batch_first):
    torch.manual_seed(0)
    ref, meta = mha_pair({}, batch_first)
    params = perturbed(meta)
    ref.load_state_dict(params)
    x = torch.randn(N, L, E, dtype=F64)
    assert_close(meta(x, x, x, params=params), ref(x, x, x))
    assert_close(meta(x[0], x[0], x[0], params=params), ref(x[0], x[0], x[0]))


def test_mha_out_proj_is_a_meta_parameter():
    meta = mha_pair({})[1]
    assert isinstance(meta.out_proj, MetaLinear)
    names = [name for name, _ in meta.meta_named_parameters()]
    assert names == ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    q, k, v = mha_inputs({}, False)
    params = perturbed(meta)
    del params["out_proj.weight"]
    with pytest.raises(KeyError, match="'weight'"):
        meta(q, k, v, params=params)


def loop_over_tasks(meta, q, k, v, params, padding, attn_mask, **call):
    """The unbatched forward for each task with its parameters; results stacked."""
    outs, weights = [], []
    for t in range(T):
        task_params = {
            n: p if p.dim() == meta.get_parameter(n).dim() else p[t] for n, p in params.items()
        }
        out, w = meta(
            q[t], k[t], v[t],
            key_padding_mask=None if padding is None else padding[t],
            attn_mask=attn_mask if attn_mask is None or attn_mask.dim() == 2 else attn_mask[t],
            params=task_params, **call,
        )  # fmt: skip
        outs.append(out)
        weights.append(w)
    return torch.stack(outs), None if weights[0] is None else torch.stack(weights)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "4d"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("config", MHA_CONFIGS.values(), ids=MHA_CONFIGS.keys())
def test_mha_batched_matches_loop(config, batch_first, mask_kind):
    torch.manual_seed(0)
    meta = mha_pair(config, batch_first)[1]
    q, k, v = mha_inputs(config, batch_first, T)
    padding, attn_mask = masks(mask_kind, T)
    first = next(iter(dict(meta.named_parameters())))
    # Share two parameters across tasks, or one where there are only two.
    shared = (first, "out_proj.weight") if config.get("bias", True) else (first,)
    params = perturbed(meta, T, shared=shared)
    for call in CALLS:
        kwargs = dict(key_padding_mask=padding, attn_mask=attn_mask, params=params, **call)
        out, weights = meta(q, k, v, **kwargs)
        ref_out, ref_weights = loop_over_tasks(meta, q, k, v, params, padding, attn_mask, **call)
        assert out.shape == (T, *((N, L) if batch_first else (L, N)), E)
        assert_close(out, ref_out)
        assert_close(weights, ref_weights)


@pytest.mark.parametrize("config", MHA_CONFIGS.values(), ids=MHA_CONFIGS.keys())
def test_mha_batched_gradients_to_second_order(config):
    torch.manual_seed(0)
    meta = mha_pair(config)[1]
    q, k, v = mha_inputs(config, False, T)
    q.requires_grad_(True)
    padding, attn_mask = masks("bool", T)
    params = perturbed(meta, T, shared=("out_proj.weight",))
    for p in params.values():
        p.requires_grad_(True)
    leaves = [q, *params.values()]
    weight_out = torch.randn(T, L, N, E, dtype=F64)

    def first_and_second(out, weights):
        loss = (out * weight_out).sum() + (weights**2).sum()
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        # A bias's gradient does not depend on that bias: its second-order term is zero.
        second = torch.autograd.grad(
            sum((g**2).sum() for g in grads), leaves, allow_unused=True, materialize_grads=True
        )
        return grads, second

    batched = first_and_second(
        *meta(q, k, v, key_padding_mask=padding, attn_mask=attn_mask, params=params)
    )
    looped = first_and_second(*loop_over_tasks(meta, q, k, v, params, padding, attn_mask))
    assert_close(batched, looped)


def test_mha_batched_dropout_in_training():
    torch.manual_seed(0)
    meta = mha_pair({}, dropout=0.5)[1]
    q, k, v = mha_inputs({}, False, T)
    params = perturbed(meta, T)
    call = dict(params=params, average_attn_weights=False)
    dropped = meta.train()(q, k, v, **call)[1]
    kept = meta.eval()(q, k, v, **call)[1]
    assert (dropped == 0).any() and (dropped != 0).any()
    assert_close(dropped, torch.where(dropped == 0, 0.0, kept / 0.5))


def test_mha_batched_errors():
    meta = mha_pair({})[1]
    q, k, v = mha_inputs({}, False, T)
    params = perturbed(meta, T)
    with pytest.raises(RuntimeError, match="is_causal"):
        meta(q, k, v, is_causal=True, params=params)
    with pytest.raises(ValueError, match="key_padding_mask"):
        meta(q, k, v, key_padding_mask=torch.zeros(N, S, dtype=torch.bool), params=params)
    with pytest.raises(ValueError, match="attn_mask"):
        meta(q, k, v, attn_mask=torch.zeros(L, L, dtype=torch.bool), params=params)
    with pytest.raises(ValueError, match="task-batched input"):
        meta(q[:2], k[:2], v[:2], params=params)


# ---- metafy ---------------------------------------------------------------------------


def plain_conv4(channels=4, ways=5):
    """A plain ``nn`` Conv-4 (max-pooling) on [1, 16, 16] images."""
    return conv4(
        ways, in_channels=1, hidden=channels, image_size=16, pool=True, layers=PLAIN_LAYERS
    ).to(F64)


def mlp():
    body = nn.Sequential(
        nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh()
    )
    return nn.Sequential(OrderedDict(body=body, head=nn.Linear(16, 3))).to(F64)


MODELS = {"conv4": (plain_conv4, (1, 16, 16)), "mlp": (mlp, (6,))}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", MODELS)
def test_metafy_shares_tensors_and_matches_outputs(name, training):
    torch.manual_seed(0)
    build, sample_shape = MODELS[name]
    model = build().train(training)
    meta = metafy(model)
    assert isinstance(meta, MetaSequential)
    assert list(dict(meta.named_parameters())) == list(dict(model.named_parameters()))
    assert all(a is b for a, b in zip(meta.parameters(), model.parameters(), strict=True))
    assert all(a is b for a, b in zip(meta.buffers(), model.buffers(), strict=True))
    assert list(meta.state_dict()) == list(model.state_dict())
    assert [m.training for m in meta.modules()] == [m.training for m in model.modules()]
    for original, converted in zip(model.modules(), meta.modules(), strict=True):
        if next(original.parameters(recurse=False), None) is not None:
            assert type(converted) is META_EQUIVALENT[type(original)]
        elif not isinstance(original, nn.Sequential):
            assert converted is original
    x = torch.randn(N, *sample_shape, dtype=F64)
    assert_close(meta(x), model(x), rtol=0, atol=0)
    params = perturbed(model)
    assert_close(meta(x, params=params), functional_call(model, params, (x,)))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", MODELS)
def test_metafy_task_batched_matches_loop(name, training):
    torch.manual_seed(0)
    build, sample_shape = MODELS[name]
    model = build().train(training)
    meta = metafy(model)
    first = next(iter(dict(model.named_parameters())))
    params = perturbed(model, T, shared=(first,))
    x = torch.randn(T, N, *sample_shape, dtype=F64)
    looped = [
        functional_call(model, {n: p if n == first else p[t] for n, p in params.items()}, (x[t],))
        for t in range(T)
    ]
    assert_close(meta(x, params=params), torch.stack(looped))


def test_metafy_every_supported_layer():
    torch.manual_seed(0)
    layers = nn.ModuleDict(
        {
            "conv1d": nn.Conv1d(2, 3, 3),
            "conv3d": nn.Conv3d(2, 3, 2, padding_mode="circular", padding=1),
            "bn1d": nn.BatchNorm1d(2),
            "bn3d": nn.BatchNorm3d(2).eval(),
            "group": nn.GroupNorm(2, 4),
            "embedding": nn.Embedding(10, 3, padding_idx=0),
        }
    ).to(F64)
    inputs = {
        "conv1d": torch.randn(N, 2, 6, dtype=F64),
        "conv3d": torch.randn(N, 2, 3, 3, 3, dtype=F64),
        "bn1d": torch.randn(N, 2, 5, dtype=F64),
        "bn3d": torch.randn(N, 2, 2, 2, 2, dtype=F64),
        "group": torch.randn(N, 4, 3, dtype=F64),
        "embedding": torch.tensor([[0, 3], [9, 1]]),
    }
    meta = metafy(layers)
    assert isinstance(meta, MetaModuleDict) and not meta["bn3d"].training
    for key, layer in layers.items():
        assert type(meta[key]) is META_EQUIVALENT[type(layer)]
        assert_close(meta[key](inputs[key]), layer(inputs[key]), rtol=0, atol=0)
    pair = nn.ModuleList([nn.Bilinear(3, 4, 2)]).to(F64)
    meta_pair = metafy(pair)
    assert isinstance(meta_pair, MetaModuleList) and isinstance(meta_pair[0], MetaModule)
    x1, x2 = torch.randn(N, 3, dtype=F64), torch.randn(N, 4, dtype=F64)
    assert_close(meta_pair[0](x1, x2), pair[0](x1, x2), rtol=0, atol=0)


def test_metafy_multihead_attention():
    torch.manual_seed(0)
    config = {"kdim": 3, "vdim": 5, "add_bias_kv": True}
    model = nn.MultiheadAttention(E, H, dtype=F64, **config)
    meta = metafy(model)
    assert type(meta) is MetaMultiheadAttention and isinstance(meta.out_proj, MetaLinear)
    assert meta.out_proj.weight is model.out_proj.weight
    names = [name for name, _ in model.named_parameters()]
    assert [name for name, _ in meta.meta_named_parameters()] == names
    q, k, v = mha_inputs(config, False)
    params = perturbed(model)
    assert_close(meta(q, k, v, params=params), functional_call(model, params, (q, k, v)))


class WithForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x):
        return self.linear(x) * 2


class LinearWithForward(nn.Linear):
    def forward(self, input):
        return super().forward(input) + 1


@pytest.mark.parametrize(
    "model, path, kind",
    [
        (nn.Sequential(OrderedDict(body=nn.Sequential(nn.ReLU(), WithForward()))), "body.1", "WithForward"),
        (nn.Sequential(nn.ConvTranspose2d(2, 2, 3)), "0", "ConvTranspose2d"),
        (nn.ModuleList([nn.Linear(2, 2), LinearWithForward(2, 2)]), "1", "LinearWithForward"),
        (WithForward(), "<model>", "WithForward"),
    ],
)  # fmt: skip
def test_metafy_unsupported_names_path_and_type(model, path, kind):
    with pytest.raises(TypeError, match=rf"'{path}' \(.*{kind}\).*Supported: nn\.Sequential"):
        metafy(model)


def test_metafy_keeps_parameter_free_and_meta_modules():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, Double(), shared).to(F64)
    meta = metafy(model)
    assert meta[1] is model[1] and meta[0] is meta[2] and type(model[0]) is nn.Linear
    x = torch.randn(N, 3, dtype=F64)
    assert_close(meta(x), model(x), rtol=0, atol=0)
    assert metafy(meta) is meta
    with pytest.raises(TypeError, match="model itself"):
        metafy(nn.ReLU())
