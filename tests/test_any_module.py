"""MAML for any nn.Module: a model with its own forward adapts exactly as with higher.

The reference is higher's functional model (``higher.patch.monkeypatch``) with the inner
SGD written out in float64, task by task: it shares no code with mamlext's path
(``torch.func.functional_call``, ``vmap``, the fused update).
"""

import copy

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.gradcheck import GradcheckError
from torch.nn.attention import SDPBackend, sdpa_kernel

import mamlext
from mamlext.modules import metafy

F64 = torch.float64
TASKS = 3


# ---- models with their own forward ----------------------------------------------------------


class ConvNet(nn.Module):
    """A custom forward with BatchNorm and a view that needs the batch dimension first."""

    def __init__(self, ways: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, ways)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.head(x.view(x.size(0), -1))


class Tied(nn.Module):
    """Two layers sharing one weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class FrozenBody(nn.Module):
    """A feature extractor that is never trained (requires_grad=False) and a head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.body.requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


class Transformer(nn.Module):
    """A TransformerEncoder classifier: second order through attention."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class Attention(nn.Module):
    """nn.MultiheadAttention(need_weights=False): torch's fused attention kernel."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attention(h, h, h, need_weights=False)[0].mean(1))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class KeywordForward(nn.Module):
    """``forward(x, *, mask, scale)``: inputs given as a dict of keyword arguments."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, *, mask, scale=1.0):
        h = torch.tanh(self.fc(x)) * mask.unsqueeze(-1)
        return self.head(h.sum(1) * scale)


def images(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(TASKS, 6, 1, 8, 8, generator=g, dtype=F64)


def vectors(seed: int, shape=(6, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(TASKS, *shape, generator=g, dtype=F64)


LABELS = torch.arange(3).repeat(TASKS, 2)  # [T, 6]

CASES = {  # model, inputs of seed s
    "cnn with BatchNorm": (ConvNet, images),
    "tied weights": (Tied, vectors),
    "frozen submodule": (FrozenBody, vectors),
    "LSTM": (Recurrent, lambda s: vectors(s, (6, 5, 6))),
}
# higher's patched nn.MultiheadAttention leaves out_proj.weight out of its graph (its meta-
# gradient is None), so the attention models are checked against finite differences.
ATTENTION = {"transformer": Transformer, "multi-head attention": Attention}


# ---- the reference ---------------------------------------------------------------------------


def reference(model, xs, ys, xq, yq, steps, rate, first_order=False, adapted=None,
              step_weights=None, inputs=None):  # fmt: skip
    """Meta-loss and its gradients w.r.t. the model's parameters that require grad (and
    ``rate``'s tensors), task by task with higher's functional model.

    ``rate(k, i)``: the rate of parameter ``i`` at step ``k``; ``adapted``: a mask of the
    parameters to adapt (default: those that require grad).
    """
    params = list(model.parameters())
    adapted = adapted or [p.requires_grad for p in params]
    fmodel = higher.patch.monkeypatch(model, copy_initial_weights=False)
    inputs = inputs or (lambda x, t: ((x[t],), {}))
    total = 0
    for t in range(TASKS):
        fast = list(params)
        query_losses = []
        for k in range(steps):
            args, kwargs = inputs(xs, t)
            loss = F.cross_entropy(fmodel(*args, params=fast, **kwargs), ys[t])
            wanted = [p for p, a in zip(fast, adapted) if a]
            grads = iter(torch.autograd.grad(loss, wanted, create_graph=not first_order))
            fast = [
                p - rate(k, i) * next(grads) if a else p
                for i, (p, a) in enumerate(zip(fast, adapted))
            ]
            if step_weights is not None:
                args, kwargs = inputs(xq, t)
                query_losses.append(step_weights[k] * F.cross_entropy(fmodel(*args, params=fast, **kwargs), yq[t]))  # fmt: skip
        args, kwargs = inputs(xq, t)
        last = F.cross_entropy(fmodel(*args, params=fast, **kwargs), yq[t])
        total = total + (sum(query_losses) if step_weights is not None else last)
    return total / TASKS


def assert_meta_gradients_equal(loss, ref_loss, tensors, ref_tensors):
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    ref = torch.autograd.grad(ref_loss, ref_tensors, allow_unused=True)
    scale = torch.cat([g.flatten() for g in ref if g is not None]).norm()
    for g, r in zip(grads, ref):
        assert (g is None) == (r is None)
        if g is not None:  # relative to the whole gradient (a bias before BatchNorm is ~0)
            assert (g - r).norm() <= 1e-10 * scale, (g - r).norm() / scale


def twins(make):
    torch.manual_seed(0)
    model = make().to(F64)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("batched", [False, True], ids=["per-task", "all tasks (vmap)"])
@pytest.mark.parametrize("case", list(CASES))
def test_second_order_meta_gradient_equals_higher(case, batched):
    make, inputs = CASES[case]
    model, ref_model = twins(make)
    maml = mamlext.MAML(model, step_size=0.3, num_steps=2, batched="auto")
    xs, xq = inputs(1), inputs(2)
    if batched and not maml.use_batched(xs, xq):
        assert case == "LSTM"  # no vmap batching rule: the per-task loop serves
        with pytest.raises(ValueError, match="recurrent layer"):
            mamlext.MAML(make().to(F64), batched=True)
        return
    maml.batched = batched
    assert maml.use_batched(xs, xq) is batched
    loss, _ = maml(xs, LABELS, xq, LABELS)
    ctx = sdpa_kernel(SDPBackend.MATH)  # the reference needs it too (flash: no double backward)
    with ctx:
        ref_loss = reference(ref_model, xs, LABELS, xq, LABELS, 2, lambda k, i: 0.3)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert_meta_gradients_equal(
        loss, ref_loss, trained, [p for p in ref_model.parameters() if p.requires_grad]
    )
    if case == "frozen submodule":
        assert maml.adapted_names == ["head.weight", "head.bias"]


def finite_difference_check(maml, model, xs, ys, xq, yq, per_tensor=2, seed=4):
    """The meta-gradient against central differences of the meta-loss, a few entries of every
    parameter tensor, float64."""
    params = dict(model.named_parameters())
    loss = maml(xs, ys, xq, yq)[0]
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    scale = torch.cat([g.flatten() for g in grads.values()]).norm()
    g = torch.Generator().manual_seed(seed)
    for name, p in params.items():
        for _ in range(per_tensor):
            index = tuple(int(torch.randint(n, (), generator=g)) for n in p.shape)
            with torch.no_grad():
                p[index] += 1e-6
            up = maml(xs, ys, xq, yq)[0].detach()
            with torch.no_grad():
                p[index] -= 2e-6
            down = maml(xs, ys, xq, yq)[0].detach()
            with torch.no_grad():
                p[index] += 1e-6
            numeric = float((up - down) / 2e-6)
            assert abs(numeric - float(grads[name][index])) <= 1e-7 * float(scale), (name, index)


@pytest.mark.parametrize("batched", [False, True], ids=["per-task", "all tasks (vmap)"])
@pytest.mark.parametrize("case", list(ATTENTION))
def test_second_order_through_attention_against_finite_differences(case, batched):
    """Second order through attention: torch's fused kernel has no double backward (the
    error a user meets with plain autograd), so mamlext takes the math kernel by itself."""
    torch.manual_seed(0)
    model = ATTENTION[case]().to(F64)
    x = vectors(1, (6, 5, 6))
    with pytest.raises(RuntimeError, match="derivative for .*scaled_dot_product.* not implemented"):
        params = dict(model.named_parameters())
        out = torch.func.functional_call(model, params, (x[0],))
        grads = torch.autograd.grad(F.cross_entropy(out, LABELS[0]), list(params.values()),
                                    create_graph=True)  # fmt: skip
        torch.autograd.grad(sum(g.sum() for g in grads), list(params.values()))
    maml = mamlext.MAML(model, step_size=0.3, num_steps=2, batched=batched)
    assert maml.use_batched(x, x) is batched
    finite_difference_check(maml, model, x, LABELS, vectors(2, (6, 5, 6)), LABELS)


VARIANTS = ["first order", "meta-sgd", "maml++ rates and multi-step loss", "anil", "recompute"]


@pytest.mark.parametrize("batched", [False, True], ids=["per-task", "all tasks (vmap)"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_on_a_custom_forward_equals_higher(variant, batched):
    model, ref_model = twins(ConvNet)
    options = dict(step_size=0.3, num_steps=3, batched=batched)
    if variant == "first order":
        options["first_order"] = True
    elif variant == "meta-sgd":
        options["step_size_mode"] = "per_element"
    elif variant == "maml++ rates and multi-step loss":
        options["step_size_mode"] = "per_layer_per_step"
    elif variant == "anil":
        options["adapt_params"] = ["head"]
    else:
        options["inner_checkpoint"] = 1
    maml = mamlext.MAML(model, **options)
    with torch.no_grad():  # learned rates away from their start, as after training
        for r in maml.step_sizes.rates:
            r.mul_(torch.rand_like(r) + 0.5)
    weights = [0.2, 0.3, 0.5] if "multi-step" in variant else None
    xs, xq = images(1), images(2)
    if variant == "recompute":
        loss, _ = maml.meta_backward(xs, LABELS, xq, LABELS)
        grads = [p.grad for p in model.parameters()]
    else:
        loss, _ = maml(xs, LABELS, xq, LABELS, step_weights=weights)
    rates = [r.detach().clone().requires_grad_() for r in maml.step_sizes.rates]
    names = [n for n, _ in model.named_parameters()]
    position = {n: i for i, n in enumerate(maml.adapted_names)}

    def rate(k, i):
        if not rates:
            return 0.3
        r = rates[position[names[i]]]
        return r[min(k, r.shape[0] - 1)] if variant.startswith("maml++") else r

    adapted = [n in position for n in names]
    ref_loss = reference(
        ref_model, xs, LABELS, xq, LABELS, 3, rate, first_order=variant == "first order",
        adapted=adapted, step_weights=weights,
    )  # fmt: skip
    if variant == "recompute":
        ref = torch.autograd.grad(ref_loss, list(ref_model.parameters()))
        scale = torch.cat([g.flatten() for g in ref]).norm()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
        for g, r in zip(grads, ref):
            assert (g - r).norm() <= 1e-10 * scale
        return
    assert_meta_gradients_equal(
        loss, ref_loss, [*model.parameters(), *maml.step_sizes.rates],
        [*ref_model.parameters(), *rates],
    )  # fmt: skip


def test_keyword_arguments_as_a_dict_of_inputs():
    model, ref_model = twins(KeywordForward)
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(TASKS, 6, 5, generator=g) > 0.3).to(F64)
    xs = {"x": vectors(1, (6, 5, 6)), "mask": mask, "scale": 0.5}
    xq = {"x": vectors(2, (6, 5, 6)), "mask": mask, "scale": 0.5}
    for batched in (False, True):
        maml = mamlext.MAML(model, step_size=0.3, num_steps=2, batched=batched)
        loss, out = maml(xs, LABELS, xq, LABELS)
        assert out.shape == (TASKS, 6, 3)

        def inputs(x, t):
            return (), {"x": x["x"][t], "mask": x["mask"][t], "scale": x["scale"]}

        ref_loss = reference(ref_model, xs, LABELS, xq, LABELS, 2, lambda k, i: 0.3, inputs=inputs)
        assert_meta_gradients_equal(
            loss, ref_loss, list(model.parameters()), list(ref_model.parameters())
        )


# ---- BatchNorm: the policy reaches a BatchNorm inside any forward ------------------------------


@pytest.mark.parametrize("bn", ["transductive", "per_step", "running", None])
def test_batchnorm_policies_as_for_meta_layers(bn):
    """A plain nn.Sequential (run through its own forward) against its metafy twin (Meta
    layers, tested against references elsewhere): losses, meta-gradients and the running
    statistics after meta-training, and meta-test outputs in eval mode."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    ).to(F64)  # fmt: skip
    meta = metafy(copy.deepcopy(plain))
    runs = []
    for model in (plain, meta):
        maml = mamlext.MAML(model, step_size=0.3, num_steps=2, bn=bn, batched=False)
        results = []
        for seed in (1, 2):
            loss, _ = maml(images(seed), LABELS, images(seed + 10), LABELS)
            results += [loss, *torch.autograd.grad(loss, list(model.parameters()))]
        maml.eval()
        results.append(maml(images(5), LABELS, images(6), LABELS)[1])
        results += [b.clone() for b in model.buffers()]
        runs.append(results)
    assert isinstance(plain[1], nn.BatchNorm2d) and type(plain[1]).__name__ == "MetaBatchNorm2d"
    assert [n for n, _ in plain.named_buffers()] == [n for n, _ in meta.named_buffers()]
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_the_batchnorm_guards_hold_for_a_custom_forward():
    """docs/train_eval.md's guards: adapt() in training mode cannot train running statistics;
    a BatchNorm in eval mode with never-trained statistics is refused at meta-training."""
    model = ConvNet().to(F64)
    maml = mamlext.MAML(model, bn="per_step")
    with pytest.raises(ValueError, match="maml.adapt\\(\\) in training mode cannot train"):
        maml.adapt(images(1), LABELS)
    model.bn.eval()
    with pytest.raises(ValueError, match="'bn' is in eval mode during meta-training"):
        maml(images(1), LABELS, images(2), LABELS)


# ---- what cannot work gets a clear error -------------------------------------------------------


def test_a_lazy_module_not_yet_initialised_is_refused():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(TypeError, match=r"'0' \(LazyLinear\) is a lazy module.*run one forward"):
        mamlext.MAML(model)
    model(torch.randn(2, 6))  # initialised: accepted
    mamlext.MAML(model)


def test_a_forward_that_changes_its_parameters_in_place_is_refused():
    class Clamping(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            with torch.no_grad():
                self.fc.weight.clamp_(-1, 1)
            return self.fc(x)

    with pytest.raises(RuntimeError, match=r"modified \['fc.weight'\] in place"):
        mamlext.MAML(Clamping(), batched=False)(torch.randn(2, 4, 6), LABELS[:2, :4],
                                                 torch.randn(2, 4, 6), LABELS[:2, :4])  # fmt: skip


@pytest.mark.parametrize("steps", [1, 2])
def test_a_parameter_read_around_the_module_is_refused(steps):
    """A forward that reads a captured tensor instead of its attribute cannot be given the
    adapted value: refused with its name, instead of a wrong meta-gradient."""

    class Captured(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)
            self.captured = [self.fc.weight]  # a reference functional_call cannot replace

        def forward(self, x):
            return F.linear(x, self.captured[0], self.fc.bias)

    x = torch.randn(2, 4, 6)
    maml = mamlext.MAML(Captured(), batched=False, num_steps=steps)
    # one step: the query pass finds it; two: the second step's inner gradient already does
    with pytest.raises(ValueError, match=r"(does not read|does not depend on) \['fc.weight'\]"):
        maml(x, LABELS[:2, :4], x, LABELS[:2, :4])


def test_a_reparametrised_weight_against_finite_differences():
    """The adapted tensor is the parametrization's original; the meta-gradient equals central
    finite differences of the meta-loss in float64."""

    class Symmetric(nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).T

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", Symmetric())
    maml = mamlext.MAML(model, step_size=0.3, num_steps=2, batched=False)
    xs, xq = vectors(1), vectors(2)

    def meta_loss():
        return maml(xs, LABELS, xq, LABELS)[0]

    params = dict(model.named_parameters())
    assert "0.parametrizations.weight.original" in params
    grads = dict(zip(params, torch.autograd.grad(meta_loss(), list(params.values()))))
    g = torch.Generator().manual_seed(4)
    for name, p in params.items():
        for _ in range(3):
            index = tuple(int(torch.randint(s, (), generator=g)) for s in p.shape)
            eps = 1e-6
            with torch.no_grad():
                p[index] += eps
            up = meta_loss().detach()
            with torch.no_grad():
                p[index] -= 2 * eps
            down = meta_loss().detach()
            with torch.no_grad():
                p[index] += eps
            numeric = (up - down) / (2 * eps)
            assert abs(float(numeric - grads[name][index])) < 1e-8, (name, index)


def test_torch_weight_norm_has_a_wrong_second_derivative():
    """The reason for the refusal below, measured: torch._weight_norm (both weight_norm
    utilities use it) fails gradgradcheck with respect to its direction v."""
    v = torch.randn(4, 3, dtype=F64, requires_grad=True)
    g = torch.rand(4, 1, dtype=F64)
    assert torch.autograd.gradcheck(lambda v: torch._weight_norm(v, g, 0), (v,))
    with pytest.raises(GradcheckError, match="Jacobian mismatch"):
        torch.autograd.gradgradcheck(lambda v: torch._weight_norm(v, g, 0), (v,))


@pytest.mark.parametrize("kind", ["nn.utils.weight_norm", "parametrizations.weight_norm"])
def test_weight_norm_is_refused_in_second_order_and_exact_in_first_order(kind):
    """Second order through weight_norm would be a wrong meta-gradient (above): refused with
    the reason. First order equals the same model with the weight written out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    plain = copy.deepcopy(model)
    if kind == "nn.utils.weight_norm":
        model[0] = torch.nn.utils.weight_norm(model[0])
    else:
        model[0] = torch.nn.utils.parametrizations.weight_norm(model[0])
    xs, xq = vectors(1), vectors(2)
    with pytest.raises(ValueError, match=r"\['0'\] use weight normalisation.*first_order=True"):
        mamlext.MAML(model, step_size=0.3, batched=False)(xs, LABELS, xq, LABELS)
    maml = mamlext.MAML(model, step_size=0.3, num_steps=2, batched=False, first_order=True)
    loss, _ = maml(xs, LABELS, xq, LABELS)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    class Explicit(nn.Module):  # the same weight, g * v / ||v|| per output row, written out
        def __init__(self):
            super().__init__()
            names = [n for n, _ in model.named_parameters()]
            values = [p.detach().clone() for p in model.parameters()]
            for name, value in zip(names, values):
                self.register_parameter(name.replace(".", "_"), nn.Parameter(value))
            self.names = [n.replace(".", "_") for n in names]

        def forward(self, x):
            b0, g0, v0, w2, b2 = (getattr(self, n) for n in self.names)
            w0 = g0 * v0 / v0.norm(dim=1, keepdim=True)
            return F.linear(torch.tanh(F.linear(x, w0, b0)), w2, b2)

    explicit = Explicit()
    ref = mamlext.MAML(explicit, step_size=0.3, num_steps=2, batched=False, first_order=True)
    ref_loss, _ = ref(xs, LABELS, xq, LABELS)
    ref_grads = torch.autograd.grad(ref_loss, list(explicit.parameters()))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    del plain
