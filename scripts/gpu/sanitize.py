"""A small driver of the CUDA kernel for compute-sanitizer (memcheck, initcheck).

Every launch shape that indexing could get wrong, once, each checked against the float64
oracle: tails of 1 to 15 elements, views offset by 1 to 7 elements, chunk boundaries, more
tensors than one launch holds in four interleaved dtypes, every rate layout, and a backward.
Run it with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its own allocation
and an access past one is an error, not a read of its neighbour (scripts/gpu/check.sh).

    compute-sanitizer --tool memcheck python3 scripts/gpu/sanitize.py [--device cuda]
"""

import argparse

import torch

import mamlext

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def case(device: torch.device):
    """(params, grads, rates) covering the shapes above."""
    params, grads, rates = [], [], []

    def add(p, g, rate):
        params.append(p)
        grads.append(g)
        rates.append(rate)

    for k, dtype in enumerate(DTYPES * 30):  # 120 tensors: three launches per dtype group
        n = 1 + (k * 13) % 40
        make = lambda n=n, dtype=dtype: torch.randn(n, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
        rate = 0.3 if k % 3 == 0 else (make().abs() + 0.1 if k % 3 == 1 else make()[:1].abs())
        add(make(), make(), rate)
    for offset in range(1, 8):  # misaligned views, element-wise rates misaligned too
        base = [torch.randn(4096 + offset, device=device) for _ in range(3)]
        add(base[0][offset:], base[1][offset:], base[2][offset:].abs() + 0.1)
    for numel in (65535, 65536, 65537, 3 * 65536 + 5):  # chunk boundaries, per-task rates
        p = torch.randn(5, numel, device=device, dtype=torch.float16)
        add(p, torch.randn_like(p), torch.rand(5, 1, device=device, dtype=torch.float16))
    return params, grads, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    device = torch.device(parser.parse_args().device)
    torch.manual_seed(0)
    params, grads, rates = case(device)
    params = [p.detach().requires_grad_() for p in params]
    out = mamlext.fused_sgd(params, grads, rates)
    torch.autograd.backward(out, [torch.ones_like(o) for o in out])
    if device.type == "cuda":
        torch.cuda.synchronize()
    for i, (o, p, g, r) in enumerate(zip(out, params, grads, rates)):
        r = r.double() if isinstance(r, torch.Tensor) else r
        want = (p.detach().double() - r * g.double()).to(p.dtype)
        torch.testing.assert_close(o, want, msg=lambda m, i=i: f"tensor {i}: {m}")
        assert torch.equal(p.grad, torch.ones_like(p)), i
    status = mamlext.backend_info()[device.type]
    print(f"sanitize driver: {len(out)} tensors correct on {device} ({status.kernel} kernel)")


if __name__ == "__main__":
    main()
