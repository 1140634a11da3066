"""mamlext.fused_sgd: values, autograd to second order, torch.func, kernels, errors."""

import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch.autograd import gradcheck, gradgradcheck
from torch.func import grad, hessian, jvp, vmap

import mamlext
from mamlext.ops import fused_sgd, reference_fused_sgd
from tests.conftest import DEVICES

F64 = torch.float64


def oracle(params, grads, lr):
    """p - lr * g in float64, tensor by tensor: the reference every kernel is checked against."""
    rates = lr if isinstance(lr, (list, tuple)) else [lr] * len(params)
    outs = []
    for p, g, r in zip(params, grads, rates):
        r = r.detach().double() if isinstance(r, torch.Tensor) else r
        outs.append((p.detach().double() - r * g.detach().double()).to(p.dtype))
    return outs


SHAPES = [(3, 4), (5,), (2, 3, 2), ()]


def lr_cases(shapes, dtype, device, requires_grad=True):
    """Every accepted learning-rate form, for tensors of ``shapes`` with task dim first."""

    def t(*shape):
        return (torch.rand(shape, dtype=dtype, device=device) + 0.1).requires_grad_(requires_grad)

    return {
        "float": 0.3,
        "0-dim tensor": t(),
        "per-tensor floats": [0.1 * (i + 1) for i in range(len(shapes))],
        "per-tensor mixed": [t() if i % 2 else 0.2 for i in range(len(shapes))],
        "meta-sgd per-element": [t(*s) for s in shapes],
        "per-task [T,1,...]": [t(*s[:1], *([1] * (len(s) - 1))) for s in shapes],
        "broadcast middle dim": [t(*[1 if d == 0 else n for d, n in enumerate(s)]) for s in shapes],
    }


def make_lists(shapes, dtype=F64, device="cpu", requires_grad=True):
    params = [
        torch.randn(s, dtype=dtype, device=device, requires_grad=requires_grad) for s in shapes
    ]
    grads = [
        torch.randn(s, dtype=dtype, device=device, requires_grad=requires_grad) for s in shapes
    ]
    return params, grads


def lr_tensors(lr):
    items = lr if isinstance(lr, list) else [lr]
    return [x for x in items if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(lr_cases(SHAPES, F64, "cpu")))
def test_values_match_float64_oracle(device, case):
    params, grads = make_lists(SHAPES, device=device)
    lr = lr_cases(SHAPES, F64, device)[case]
    out = fused_sgd(params, grads, lr)
    torch.testing.assert_close(out, oracle(params, grads, lr))
    for o, p in zip(out, params):
        assert o.shape == p.shape and o.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", [list, tuple])
def test_per_tensor_rates_of_another_dtype_are_cast_and_get_their_gradient(device, form):
    """Rates that need a cast take the normalising path; rates that need none skip it."""
    params, grads = make_lists(SHAPES, device=device)
    for rate_dtype in (torch.float32, F64):  # cast, then none needed
        rates = [
            (torch.rand(s, device=device) + 0.1).to(rate_dtype).requires_grad_() for s in SHAPES
        ]
        out = fused_sgd(params, grads, form(rates))
        torch.testing.assert_close(out, oracle(params, grads, rates))
        weights = [torch.randn_like(o) for o in out]
        got = torch.autograd.grad(out, rates, weights)
        for g, w, d in zip(grads, weights, got):
            assert d.dtype == rate_dtype
            torch.testing.assert_close(d, (-(g * w)).to(rate_dtype))


SCALAR_CASES = ("float", "per-tensor floats")


@pytest.mark.parametrize(
    "case,needs",
    [
        (case, needs)
        for case in lr_cases(SHAPES, F64, "cpu")
        for needs in ["p", "g", "lr", "p+g", "p+lr", "g+lr", "p+g+lr"]
        if not (case in SCALAR_CASES and needs == "lr")
    ],
)
def test_gradcheck_and_gradgradcheck(case, needs):
    shapes = [(2, 3), (2,), (2, 2, 2)]
    params, grads = make_lists(shapes)
    lr = lr_cases(shapes, F64, "cpu")[case]
    for x in params:
        x.requires_grad_("p" in needs.split("+"))
    for x in grads:
        x.requires_grad_("g" in needs.split("+"))
    rates = lr_tensors(lr)
    for x in rates:
        x.requires_grad_("lr" in needs.split("+"))
    n = len(shapes)

    def f(*tensors):
        it = iter(tensors[2 * n :])
        rate = (
            [next(it) if isinstance(r, torch.Tensor) else r for r in lr]
            if isinstance(lr, list)
            else (next(it) if isinstance(lr, torch.Tensor) else lr)
        )
        return tuple(fused_sgd(tensors[:n], tensors[n : 2 * n], rate))

    inputs = (*params, *grads, *rates)
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


def test_lr_gradient_is_reduced_to_lr_shape():
    p, g = torch.randn(4, 3, 2, dtype=F64), torch.randn(4, 3, 2, dtype=F64)
    lr = torch.full((4, 1, 1), 0.5, dtype=F64, requires_grad=True)
    (out,) = fused_sgd([p], [g], [lr])
    (dlr,) = torch.autograd.grad(out.sum(), lr)
    torch.testing.assert_close(dlr, -g.sum(dim=(1, 2), keepdim=True))


def _op_inputs(requires_grad, device="cpu"):
    params, grads = make_lists([(3, 4), (2, 5)], device=device, requires_grad=requires_grad)
    lrs = [
        torch.rand(3, 1, dtype=F64, device=device, requires_grad=requires_grad),
        torch.rand((), dtype=F64, device=device),
    ]
    return params, grads, lrs


OPCHECK_CASES = {
    "tensor-lrs-grad": lambda device: (*_op_inputs(True, device), [1.0, 1.0]),
    "tensor-lrs": lambda device: (*_op_inputs(False, device), [1.0, 1.0]),
    "scalar-lrs": lambda device: (*_op_inputs(True, device)[:2], [None, None], [0.1, 0.2]),
    "mixed-lrs": lambda device: (
        *_op_inputs(False, device)[:2],
        [None, _op_inputs(False, device)[2][1]],
        [0.1, 1.0],
    ),
    "non-contiguous": lambda device: (  # transposed params and grads
        [torch.randn(4, 3, dtype=F64, device=device).t()],
        [torch.randn(4, 3, dtype=F64, device=device).t()],
        [None],
        [0.5],
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(device, case):
    mamlext.backend_info()  # the native kernels (and their autograd rule) are registered
    torch.library.opcheck(torch.ops.mamlext.fused_sgd.default, OPCHECK_CASES[case](device))


@pytest.mark.parametrize("device", DEVICES)
def test_native_autograd_rule_takes_mixed_lrs_that_require_grad(device):
    """The C++ rule routes gradients into a Tensor?[] that holds a None."""
    if mamlext.backend_info()[device].kernel != "native":
        pytest.skip(f"the native {device} kernel is not in use")
    params, grads, lrs = _op_inputs(True, device)
    lrs = [None, lrs[0].requires_grad_()]
    params, grads = params[::-1], grads[::-1]  # lrs[1] of shape [3, 1] for params[1] [3, 4]
    outs = torch.ops.mamlext.fused_sgd(params, grads, lrs, [0.1, 1.0])
    weights = [torch.randn_like(o) for o in outs]
    dp0, dg0, dp1, dg1, dlr = torch.autograd.grad(
        outs, [params[0], grads[0], params[1], grads[1], lrs[1]], weights
    )
    torch.testing.assert_close(outs, oracle(params, grads, [0.1, lrs[1]]))
    torch.testing.assert_close([dp0, dp1], weights)
    torch.testing.assert_close(dg0, -0.1 * weights[0])
    torch.testing.assert_close(dg1, -lrs[1].detach() * weights[1])
    torch.testing.assert_close(dlr, -(grads[1].detach() * weights[1]).sum(1, keepdim=True))


def test_python_autograd_rule_rejects_mixed_lrs_that_require_grad():
    # The Python rule (devices without a native kernel, here "meta") cannot route a
    # gradient into a Tensor?[] that holds a None; mamlext.fused_sgd handles that case.
    params, grads, lrs = _op_inputs(True, "meta")
    with pytest.raises(ValueError, match="lr tensor for every entry"):
        torch.ops.mamlext.fused_sgd(params, grads, [None, lrs[1].requires_grad_()], [0.1, 1.0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_native_kernel_matches_reference(device, dtype):
    status = mamlext.backend_info()[device]
    if status.kernel != "native":
        pytest.skip(f"the native {device} kernel is not in use: {status.reason}")
    shapes = [(32, 64, 1, 3, 3), (32, 64), (32, 5, 1600), (32, 5), (7,), (0, 3)]
    params, grads = make_lists(shapes, dtype=dtype, device=device, requires_grad=False)
    for case, lr in lr_cases(shapes, dtype, device, requires_grad=False).items():
        lrs, scalars = mamlext.ops.wrapper.normalize_lr(lr, params)
        native = torch.ops.mamlext.fused_sgd(params, grads, lrs, scalars)
        reference = reference_fused_sgd(params, grads, lrs, scalars)
        torch.testing.assert_close(native, reference, msg=lambda m, case=case: f"{case}: {m}")


def test_cpu_native_kernel_is_in_use():
    """CI builds the native CPU kernel; a silent fallback would hide a broken build."""
    status = mamlext.backend_info()["cpu"]
    if mamlext.ops.native.native_disabled():
        pytest.skip("MAMLEXT_NO_NATIVE is set")
    assert status.kernel == "native", status.reason
    assert status.reason in ("compiled", "loaded from cache")


def test_outputs_do_not_alias_and_inputs_are_untouched():
    params, grads = make_lists([(3, 4), (5,)], requires_grad=False)
    before = [p.clone() for p in params] + [g.clone() for g in grads]
    out = fused_sgd(params, grads, 0.5)
    for o, p, g in zip(out, params, grads):
        assert o.data_ptr() not in (p.data_ptr(), g.data_ptr())
    torch.testing.assert_close(params + grads, before, rtol=0, atol=0)


def test_zero_size_and_empty_lists():
    assert fused_sgd([], [], 0.1) == []
    p, g = torch.empty(0, 3), torch.empty(0, 3)
    (out,) = fused_sgd([p], [g], 0.1)
    assert out.shape == (0, 3)


def test_torch_func_grad_of_vmapped_two_step_inner_loop_equals_plain_loop():
    torch.manual_seed(0)

    def loss(w, x):
        return ((x @ w).sin() ** 2).sum()

    def adapted_loss(update, w, x, lr):
        for _ in range(2):
            w = update(w, grad(loss)(w, x), lr)
        return loss(w, x)

    def fused(w, gw, lr):
        return fused_sgd([w], [gw], [lr])[0]

    def plain(w, gw, lr):
        return w - lr * gw

    w, xs = torch.randn(4, 2, dtype=F64), torch.randn(5, 3, 4, dtype=F64)
    lr = torch.full((4, 1), 0.1, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vmap must not fall back to a loop
        got = vmap(grad(adapted_loss, argnums=(1, 3)), in_dims=(None, None, 0, None))(
            fused, w, xs, lr
        )
    want = vmap(grad(adapted_loss, argnums=(1, 3)), in_dims=(None, None, 0, None))(plain, w, xs, lr)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        hessian(adapted_loss, argnums=1)(fused, w, xs[0], lr),
        hessian(adapted_loss, argnums=1)(plain, w, xs[0], lr),
    )
    tangents = (torch.randn_like(w), torch.randn_like(lr))
    torch.testing.assert_close(
        jvp(lambda w, lr: fused(w, w.cos(), lr), (w, lr), tangents),
        jvp(lambda w, lr: plain(w, w.cos(), lr), (w, lr), tangents),
    )


# ---- bad input -------------------------------------------------------------------------


def test_forward_mode_ad_outside_torch_func():
    p, g = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    lr = torch.rand(2, dtype=F64)
    dp, dg, dlr = (torch.randn_like(x) for x in (p, g, lr))
    with torch.autograd.forward_ad.dual_level():
        dual = [torch.autograd.forward_ad.make_dual(x, t) for x, t in ((p, dp), (g, dg), (lr, dlr))]
        (out,) = fused_sgd([dual[0]], [dual[1]], [dual[2]])
        tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, dp - lr * dg - dlr * g)


def test_torch_compile_of_a_first_order_step():
    torch.manual_seed(0)
    w, x, y = torch.randn(4, 3, requires_grad=True), torch.randn(8, 4), torch.randn(8, 3)

    def step(w, lr: float):
        inner = ((x @ w - y) ** 2).mean()
        (gw,) = torch.autograd.grad(inner, w)
        (fast,) = fused_sgd([w], [gw], lr)
        return ((x @ fast - y) ** 2).mean()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)
    loss = compiled(w, 0.1)
    (meta_grad,) = torch.autograd.grad(loss, w)
    with torch.no_grad():  # first order: the meta-gradient is the query gradient at fast
        fast = w - 0.1 * 2 * x.T @ (x @ w - y) / y.numel()
        want = 2 * x.T @ (x @ fast - y) / y.numel()
    torch.testing.assert_close(meta_grad, want)


BAD_INPUTS = {
    "lengths": (
        lambda: ([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)], 0.1),
        ValueError,
        "1 params but 2 grads",
    ),
    "shape": (
        lambda: ([torch.zeros(2), torch.zeros(3)], [torch.zeros(2), torch.zeros(4)], 0.1),
        ValueError,
        r"grads\[1\] has shape \(4,\) but params\[1\] has shape \(3,\)",
    ),
    "dtype": (
        lambda: ([torch.zeros(2)], [torch.zeros(2, dtype=F64)], 0.1),
        TypeError,
        r"grads\[0\] has dtype torch.float64 but params\[0\] has dtype torch.float32",
    ),
    "integer": (
        lambda: ([torch.zeros(2, dtype=torch.int64)], [torch.zeros(2, dtype=torch.int64)], 1),
        TypeError,
        r"params\[0\] has dtype torch.int64",
    ),
    "lr broadcast": (
        lambda: ([torch.zeros(2, 3)], [torch.zeros(2, 3)], [torch.ones(2)]),
        ValueError,
        r"lrs\[0\] of shape \(2,\) does not broadcast to params\[0\] of shape \(2, 3\)",
    ),
    "lr enlarges": (
        lambda: ([torch.zeros(3)], [torch.zeros(3)], [torch.ones(2, 3)]),
        ValueError,
        "does not broadcast",
    ),
    "lr count": (
        lambda: ([torch.zeros(3)], [torch.zeros(3)], [0.1, 0.2]),
        ValueError,
        "2 learning rates for 1 parameter",
    ),
    "lr type": (
        lambda: ([torch.zeros(3)], [torch.zeros(3)], "0.1"),
        TypeError,
        "lr must be a float",
    ),
    "none grad": (
        lambda: ([torch.zeros(3), torch.zeros(2)], [torch.zeros(3), None], 0.1),
        ValueError,
        r"grads\[1\] is None: params\[1\] \(shape \(2,\)\)",
    ),
    "device": (
        lambda: ([torch.zeros(3)], [torch.zeros(3, device="meta")], 0.1),
        ValueError,
        r"grads\[0\] is on meta but params\[0\] is on cpu",
    ),
    # Once computed uninitialised CPU outputs: the call went to the meta kernel.
    "mixed devices": (
        lambda: (
            [torch.ones(3), torch.ones(2, device="meta")],
            [torch.ones(3), torch.ones(2, device="meta")],
            0.5,
        ),
        ValueError,
        r"params\[1\] is on meta but params\[0\] is on cpu; all tensors must be on one device",
    ),
    "complex lr": (
        lambda: ([torch.zeros(3)], [torch.zeros(3)], torch.tensor(0.5 + 1j)),
        TypeError,
        r"lr\[0\] has dtype torch.complex64, expected a real floating-point rate",
    ),
    "non-tensor param": (
        lambda: ([torch.zeros(3), [0.0, 1.0]], [torch.zeros(3), torch.zeros(2)], 0.1),
        TypeError,
        r"params\[1\] is a list, not a tensor",
    ),
    "non-tensor grad": (
        lambda: ([torch.zeros(3), torch.zeros(2)], [torch.zeros(3), 2.0], 0.1),
        TypeError,
        r"grads\[1\] is a float, not a tensor",
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(name):
    make, error, message = BAD_INPUTS[name]
    with pytest.raises(error, match=message):
        fused_sgd(*make())


@pytest.mark.parametrize("name", ["shape", "dtype", "integer", "lr broadcast", "mixed devices"])
def test_native_kernel_rejects_bad_input_itself(name):
    """The C++ checks are the only ones on the native path: same exception, same message."""
    status = mamlext.backend_info()["cpu"]
    if status.kernel != "native":
        pytest.skip(f"the native cpu kernel is not in use: {status.reason}")
    make, error, message = BAD_INPUTS[name]
    params, grads, lr = make()
    lrs = [lr[0] if isinstance(lr, list) else None] * len(params)
    # With the native library loaded, the dispatcher sends CPU calls to the C++ kernel.
    with pytest.raises(error, match=message) as raised:
        torch.ops.mamlext.fused_sgd(params, grads, lrs, [0.1] * len(params))
    with pytest.raises(error) as reference:
        mamlext.ops.reference.check_inputs(
            params, grads, lrs, [0.1] * len(params)
        )  # the reference's
    assert str(raised.value) == str(reference.value)


# ---- fuzz ------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def fuzz_lists(draw):
    n = draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(DTYPES))
    params, grads, rates = [], [], []
    for _ in range(n):
        shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
        layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))

        def make(shape=shape, layout=layout):
            if layout == "transposed" and len(shape) >= 2:
                return (
                    torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=F64)
                    .transpose(-1, -2)
                    .to(dtype)
                )
            if layout == "sliced" and shape:
                return torch.randn(*shape[:-1], shape[-1] * 2, dtype=F64)[..., ::2].to(dtype)
            if layout == "expanded" and shape:
                return torch.randn(*shape[:-1], 1, dtype=F64).expand(*shape).to(dtype)
            return torch.randn(shape, dtype=F64).to(dtype)

        params.append(make())
        grads.append(make())
        kind = draw(st.sampled_from(["float", "0-dim", "full", "leading", "random-broadcast"]))
        if kind == "float":
            rates.append(draw(st.floats(-2, 2, allow_nan=False, width=32)))
        elif kind == "0-dim":
            rates.append(torch.rand((), dtype=dtype))
        else:
            lr_shape = list(shape)
            if kind == "leading":
                k = draw(st.integers(0, len(shape)))
                lr_shape = shape[:k] + [1] * (len(shape) - k)
            elif kind == "random-broadcast":
                lr_shape = [s if draw(st.booleans()) else 1 for s in shape]
                lr_shape = lr_shape[draw(st.integers(0, len(lr_shape))) :]
            rates.append(torch.rand(lr_shape, dtype=F64).to(dtype))
    return params, grads, rates


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_lists())
def test_fuzz_against_float64_oracle(lists):
    params, grads, rates = lists
    out = fused_sgd(params, grads, rates)
    want = oracle(params, grads, rates)
    assert len(out) == len(want)
    for o, w, p in zip(out, want, params):
        assert o.shape == p.shape and o.dtype == p.dtype
        torch.testing.assert_close(o, w)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3),
    bad=st.sampled_from(["shape", "dtype", "integer", "lr broadcast", "none grad"]),
    at=st.integers(0, 2),
)
def test_fuzz_bad_input_names_the_index(n, bad, at):
    at = at % n
    params = [torch.randn(2, 3) for _ in range(n)]
    grads = [torch.randn(2, 3) for _ in range(n)]
    lr: list = [0.1] * n
    if bad == "shape":
        grads[at] = torch.randn(3, 2)
    elif bad == "dtype":
        grads[at] = grads[at].double()
    elif bad == "integer":
        params[at] = params[at].long()
        grads[at] = grads[at].long()
    elif bad == "lr broadcast":
        lr[at] = torch.rand(4)
    else:
        grads[at] = None
    with pytest.raises((ValueError, TypeError), match=rf"\[{at}\]"):
        fused_sgd(params, grads, lr)


# ---- the CUDA kernel's launch plumbing (needs a GPU) ---------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_kernel_edge_cases(dtype):
    """Several launches (> 64 tensors), chunks of large tensors with per-task rates, rate
    blocks of 2 and 3 inside one vector, misaligned views, mixed dtypes in one list."""
    status = mamlext.backend_info()["cuda"]
    assert status.kernel == "native", status.reason
    torch.manual_seed(0)
    dev = "cuda"
    params = [torch.randn(3, 5, device=dev, dtype=dtype) for _ in range(70)]
    params += [
        torch.randn(3, 70_001, device=dev, dtype=dtype),
        torch.randn(8, 2, device=dev, dtype=dtype),
    ]
    params += [
        torch.randn(7, 3, device=dev, dtype=dtype),
        torch.randn(101, device=dev, dtype=dtype)[1:],
    ]
    params += [torch.randn(33, device=dev, dtype=torch.float64)]  # another dtype in the same list
    grads = [torch.randn_like(p) for p in params]
    lrs = (
        [0.1] * 70
        + [
            torch.rand(3, 1, device=dev, dtype=dtype),  # per-task, 3 chunks per task
            torch.rand(8, 1, device=dev, dtype=dtype),  # blocks of 2
            torch.rand(7, 1, device=dev, dtype=dtype),  # blocks of 3
            torch.rand(101, device=dev, dtype=dtype)[1:],  # misaligned element-wise rates
            0.3,
        ]
    )
    out = fused_sgd(params, grads, lrs)
    want = oracle(params, grads, lrs)
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w)


def test_private_torch_internals_still_mean_what_we_read():
    """mamlext reads torch internals that may move between releases; this fails when they do.

    ``torch._C._functorch.maybe_current_level`` and ``torch.autograd.forward_ad._current_level``
    (ops/wrapper.py: is a torch.func transform or forward AD active?) and
    ``torch.utils.cpp_extension._get_build_directory`` (ops/native.py: the JIT cache folder).
    """
    from torch.utils import cpp_extension

    from mamlext.ops.wrapper import transforms_active

    assert torch._C._functorch.maybe_current_level() is None and not transforms_active()
    seen = []
    vmap(lambda x: seen.append(torch._C._functorch.maybe_current_level()) or x)(torch.ones(2))
    assert seen and seen[0] is not None
    assert torch.autograd.forward_ad._current_level == -1
    with torch.autograd.forward_ad.dual_level():
        assert torch.autograd.forward_ad._current_level >= 0 and transforms_active()
    folder = cpp_extension._get_build_directory("mamlext_probe", verbose=False)
    assert folder.endswith("mamlext_probe")
