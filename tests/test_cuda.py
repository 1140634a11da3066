"""The fused update on a GPU: every check against the float64 oracle, never the kernel itself.

Skipped without a GPU. ``MAMLEXT_TEST_DEVICE=cpu`` runs the device-generic ones on the CPU
(the rehearsal of ``scripts/gpu/check.sh``); those that only a GPU has (streams, CUDA graphs,
the sync debug mode, the profiler's kernel launches, more than 2^31 elements) skip there.
Under ``MAMLEXT_REQUIRE_NATIVE=1`` (set by the GPU check) a device whose native kernel does
not serve fails every test instead of falling back.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch.autograd import gradcheck, gradgradcheck

import mamlext
from mamlext.ops import fused_sgd
from mamlext.ops.native import ensure_loaded, native_required
from mamlext.ops.reference import check_inputs
from tests.conftest import TEST_DEVICE
from tests.test_ops import F64, fuzz_lists, lr_cases, oracle

DEVICE = torch.device(TEST_DEVICE)
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.any_device,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA device; none on this machine",
    ),
]
cuda_only = pytest.mark.skipif(DEVICE.type != "cuda", reason="only a CUDA device has it")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def assert_matches_oracle(params, grads, lr) -> None:
    out = fused_sgd(params, grads, lr)
    want = oracle(params, grads, lr)
    assert len(out) == len(want)
    for i, (o, w, p) in enumerate(zip(out, want, params)):
        assert o.shape == p.shape and o.dtype == p.dtype and o.device == p.device, i
        torch.testing.assert_close(o, w, msg=lambda m, i=i: f"tensor {i}: {m}")


def test_the_native_kernel_serves_when_required():
    if not native_required():
        pytest.skip("MAMLEXT_REQUIRE_NATIVE is not set (scripts/gpu/check.sh sets it)")
    status = ensure_loaded(DEVICE.type, strict=False)
    assert status.kernel == "native", status.reason


# ---- autograd ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(lr_cases([(2, 3)], F64, "cpu")))
def test_gradcheck_and_gradgradcheck(case):
    shapes = [(2, 3), (2,), (2, 2, 2)]
    params = [torch.randn(s, dtype=F64, device=DEVICE, requires_grad=True) for s in shapes]
    grads = [torch.randn(s, dtype=F64, device=DEVICE, requires_grad=True) for s in shapes]
    lr = lr_cases(shapes, F64, DEVICE)[case]
    rates = [r for r in (lr if isinstance(lr, list) else [lr]) if isinstance(r, torch.Tensor)]
    n = len(shapes)

    def update(*tensors):
        it = iter(tensors[2 * n :])
        if isinstance(lr, list):
            rate = [next(it) if isinstance(r, torch.Tensor) else r for r in lr]
        else:
            rate = next(it) if isinstance(lr, torch.Tensor) else lr
        return tuple(fused_sgd(list(tensors[:n]), list(tensors[n : 2 * n]), rate))

    inputs = (*params, *grads, *rates)
    assert gradcheck(update, inputs)
    assert gradgradcheck(update, inputs)


@pytest.mark.parametrize("mode", ["fixed", "per_element", "per_layer_per_step"])
def test_second_order_maml_on_the_device_equals_the_cpu(mode):
    """Meta-SGD / MAML++ rates, two inner steps, float64: the device's meta-gradients equal
    the CPU's (the CPU path is itself checked against higher in test_maml_vs_higher)."""
    from mamlext.models import conv4

    def meta_gradients(device):
        torch.manual_seed(0)
        maml = mamlext.MAML(
            conv4(3, hidden=8, image_size=12), step_size=0.3, num_steps=2, step_size_mode=mode
        ).to(device, F64)
        g = torch.Generator().manual_seed(1)
        xs, xq = (torch.randn(4, 6, 1, 12, 12, generator=g, dtype=F64) for _ in range(2))
        y = torch.arange(3).repeat(4, 2)
        loss, _ = maml(xs.to(device), y.to(device), xq.to(device), y.to(device))
        loss.backward()
        return loss.detach().cpu(), [p.grad.cpu() for p in maml.parameters()]

    cpu_loss, cpu_grads = meta_gradients("cpu")
    dev_loss, dev_grads = meta_gradients(DEVICE)
    torch.testing.assert_close(dev_loss, cpu_loss, rtol=1e-10, atol=1e-12)
    scale = torch.cat([g.flatten() for g in cpu_grads]).norm()
    for d, c in zip(dev_grads, cpu_grads):
        assert (d - c).norm() <= 1e-10 * scale


# ---- values: fuzz and boundaries ------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_lists())
def test_fuzz_against_float64_oracle(lists):
    params, grads, rates = lists
    to_device = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t  # noqa: E731
    params, grads = [to_device(p) for p in params], [to_device(g) for g in grads]
    # the layouts (transposed, sliced, expanded) survive .to(); keep them on the device too
    assert_matches_oracle(params, grads, [to_device(r) for r in rates])


def interleaved(count: int):
    """``count`` small tensors cycling through the four dtypes, with every rate form."""
    params, grads, rates = [], [], []
    for k in range(count):
        dtype = DTYPES[k % 4]
        shape = (1 + k % 3, 1 + (k * 7) % 40)
        params.append(torch.randn(shape, dtype=F64).to(dtype).to(DEVICE))
        grads.append(torch.randn(shape, dtype=F64).to(dtype).to(DEVICE))
        rate_shape = [shape, (), (shape[0], 1)][k % 4 - 1]  # per element, 0-dim, per task
        rates.append(
            0.3 if k % 4 == 0 else (torch.rand(rate_shape, dtype=F64) + 0.1).to(dtype).to(DEVICE)
        )
    return params, grads, rates


@pytest.mark.parametrize("count", [55, 56, 57, 113])
def test_many_tensors_with_interleaved_dtypes(count):
    torch.manual_seed(count)
    assert_matches_oracle(*interleaved(count))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [65535, 65536, 65537])
def test_chunk_boundaries(dtype, numel):
    torch.manual_seed(numel)
    p = torch.randn(numel, dtype=F64).to(dtype).to(DEVICE)
    g = torch.randn(numel, dtype=F64).to(dtype).to(DEVICE)
    for lr in (0.3, (torch.rand(numel, dtype=F64) + 0.1).to(dtype).to(DEVICE)):
        assert_matches_oracle([p], [g], [lr])


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_tails_and_views_offset_by_one_to_seven_elements(dtype):
    torch.manual_seed(7)
    width = 16 // torch.empty((), dtype=dtype).element_size()  # elements per 16-byte vector
    params, grads, rates = [], [], []
    for tail in range(1, width):
        for whole in (0, 3):
            n = whole * width + tail
            params.append(torch.randn(n, dtype=F64).to(dtype).to(DEVICE))
            grads.append(torch.randn(n, dtype=F64).to(dtype).to(DEVICE))
            rates.append((torch.rand(n, dtype=F64) + 0.1).to(dtype).to(DEVICE))
    for offset in range(1, 8):
        p, g = (torch.randn(4 * 1000 + offset, dtype=F64).to(dtype).to(DEVICE) for _ in range(2))
        rate = (torch.rand(4 * 1000 + offset, dtype=F64) + 0.1).to(dtype).to(DEVICE)
        params.append(p[offset:].view(4, 1000))
        grads.append(g[offset:].view(4, 1000))
        rates.append(rate[offset:].view(4, 1000))
    assert_matches_oracle(params, grads, rates)


@cuda_only
def test_more_than_2_to_the_31_elements_in_one_list():
    """One half tensor of 2^31 + 3 elements and one more (int64 indexing), checked in slices."""
    torch.manual_seed(0)
    big = 2**31 + 3
    p = [torch.randn(big, dtype=torch.float16, device=DEVICE), torch.randn(5, device=DEVICE)]
    g = [torch.randn(big, dtype=torch.float16, device=DEVICE), torch.randn(5, device=DEVICE)]
    out = fused_sgd(p, g, [0.25, 0.5])
    for start in (0, 2**31 - 4096, big - 4096, 2**30 + 17):
        piece = slice(start, start + 4096)
        want = (p[0][piece].double() - 0.25 * g[0][piece].double()).half()
        torch.testing.assert_close(out[0][piece], want)
    torch.testing.assert_close(out[1], p[1] - 0.5 * g[1])


# ---- streams, graphs, synchronisation, launches -----------------------------------------------


@cuda_only
def test_on_a_side_stream():
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        params, grads, rates = interleaved(60)
        out = fused_sgd(params, grads, rates)
    stream.synchronize()
    for o, w in zip(out, oracle(params, grads, rates)):
        torch.testing.assert_close(o, w)


@cuda_only
def test_captured_in_a_cuda_graph_and_replayed():
    """The kernel launches on the current stream (a launch elsewhere breaks the capture)."""
    torch.manual_seed(0)
    p = [torch.randn(3, 70_001, device=DEVICE), torch.randn(8, device=DEVICE)]
    g = [torch.randn_like(t) for t in p]
    lr = [torch.rand(3, 1, device=DEVICE), 0.1]
    warmup = torch.cuda.Stream()
    warmup.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warmup):
        fused_sgd(p, g, lr)  # the first call loads the kernel (its trial call syncs)
    torch.cuda.current_stream().wait_stream(warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_sgd(p, g, lr)
    for t in p + g:
        t.copy_(torch.randn_like(t))
    lr[0].copy_(torch.rand_like(lr[0]))
    graph.replay()
    torch.cuda.synchronize()
    for o, w in zip(out, oracle(p, g, lr)):
        torch.testing.assert_close(o, w)


@cuda_only
def test_no_host_synchronisation_in_forward_and_backward():
    params, grads, rates = interleaved(20)
    params = [p.float().requires_grad_() for p in params]
    grads = [g.float() for g in grads]
    rates = [r if isinstance(r, float) else r.float().requires_grad_() for r in rates]
    fused_sgd(params, grads, rates)  # loaded and tried before the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fused_sgd(params, grads, rates)
        torch.autograd.backward(out, [torch.ones_like(o) for o in out])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda_only
@pytest.mark.parametrize("groups", [{torch.float32: 30, torch.float16: 20}, {torch.float32: 113}])
def test_one_launch_per_dtype_group(groups):
    """Counted by the profiler, which also shows that the native kernel ran."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]

    params = [
        torch.randn(4, 9, dtype=d, device=DEVICE) for d, n in groups.items() for _ in range(n)
    ]
    grads = [torch.randn_like(p) for p in params]
    fused_sgd(params, grads, 0.1)
    torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        fused_sgd(params, grads, 0.1)
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if "fused_sgd_kernel" in e.name]
    want = sum(-(-n // 56) for n in groups.values())  # 56 tensors per launch at most
    assert len(launches) == want, [e.name for e in prof.events()]


# ---- errors ---------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize(
    "case",
    ["grad on the cpu", "param 1 on the cpu", "param 0 on the cpu", "lr on the cpu"],
)
def test_mixed_cpu_and_cuda_inputs_get_the_python_checks_message(case):
    """The CUDA kernel's own checks (it is dispatched to for any CUDA input) name the right
    argument, as the pure-PyTorch checks do."""
    cpu, dev = torch.device("cpu"), DEVICE
    params = [torch.zeros(3, device=dev), torch.zeros(3, device=dev)]
    grads = [torch.ones(3, device=dev), torch.ones(3, device=dev)]
    lrs: list = [None, None]
    if case == "grad on the cpu":
        grads[1] = grads[1].to(cpu)
    elif case == "param 1 on the cpu":
        params[1] = params[1].to(cpu)
    elif case == "param 0 on the cpu":
        params[0], grads[0] = params[0].to(cpu), grads[0].to(cpu)
    else:
        lrs[1] = torch.full((3,), 0.5)
    scalars = [0.1, 0.1]
    with pytest.raises(ValueError) as expected:
        check_inputs(params, grads, lrs, scalars)
    with pytest.raises(ValueError) as raised:
        torch.ops.mamlext.fused_sgd(params, grads, lrs, scalars)
    assert str(raised.value) == str(expected.value)


@cuda_only
def test_tensors_on_a_second_device_get_the_python_checks_message():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    p = [torch.zeros(3, device="cuda:0"), torch.zeros(3, device="cuda:1")]
    args = (p, [x.clone() for x in p], [None, None], [0.1, 0.1])
    with pytest.raises(ValueError) as expected:
        check_inputs(*args)
    with pytest.raises(ValueError) as raised:
        torch.ops.mamlext.fused_sgd(*args)
    assert str(raised.value) == str(expected.value)
    assert "params[1] is on cuda:1 but params[0] is on cuda:0" in str(raised.value)


@pytest.mark.parametrize("case", ["LSTM", "transformer"])
def test_second_order_through_recurrent_and_attention_layers_equals_the_cpu(case):
    """cuDNN's RNN backward and the fused attention kernels have no double backward: the
    model call takes other kernels for second-order steps (mamlext/maml/model_call.py)."""
    from tests.test_any_module import LABELS, Recurrent, Transformer, vectors

    def meta_gradients(device):
        torch.manual_seed(0)
        model = {"LSTM": Recurrent, "transformer": Transformer}[case]().to(device, F64)
        maml = mamlext.MAML(model, step_size=0.3, num_steps=2, batched=False)
        loss, _ = maml(vectors(1, (6, 5, 6)).to(device), LABELS.to(device),
                       vectors(2, (6, 5, 6)).to(device), LABELS.to(device))  # fmt: skip
        return [g.cpu() for g in torch.autograd.grad(loss, list(model.parameters()))]

    cpu, device = meta_gradients("cpu"), meta_gradients(DEVICE)
    scale = torch.cat([g.flatten() for g in cpu]).norm()
    for d, c in zip(device, cpu):
        assert (d - c).norm() <= 1e-10 * scale
