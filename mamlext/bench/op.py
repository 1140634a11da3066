"""Benchmark ``mamlext.fused_sgd`` against a Python loop and ``torch._foreach_add``.

Parameter lists: a Conv-4 (64 filters, Omniglot 5-way) whose tensors carry a leading
task dimension ``[T, *shape]`` for T = 1, 8, 32, and a ResNet-12 (~12.4M elements).
Modes:

* ``no_grad``: the forward under ``torch.no_grad()``;
* ``fwd``: the forward on inputs that require grad (records the graph, as MAML does);
* ``fwd+bwd``: the forward, then ``torch.autograd.grad`` w.r.t. params, grads (and
  rates) for random upstream gradients ``w``, i.e. the gradient of ``sum((o * w).sum())``.

Each time is a median over repeats after a warm-up (CUDA events on a GPU,
``time.perf_counter`` on a CPU); the variants of one (list, mode) are timed in turn within
each repeat, so that a change of machine load hits them alike. ``vs loop`` is the loop's
median over the variant's (> 1: faster than the loop with the same kind of learning rate);
``vs foreach`` likewise against ``torch._foreach_add`` (``_foreach_addcmul`` for
per-element rates), the fastest pure-PyTorch way to apply the update. On a GPU also: the
forward's bandwidth (read p, g and a rate tensor if any, write out) against a measured
device-to-device copy, and the CUDA kernels one no-grad forward launches. A measurement
tool: it asserts nothing about time.

    python benchmarks/bench_op.py [--device cpu|cuda] [--quick] [--dtype float32]
                                  [--csv PATH] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from torch.autograd import DeviceType

import mamlext
from mamlext.bench import report

Shape = tuple[int, ...]
LR = 0.4
MODES = ("no_grad", "fwd", "fwd+bwd")


def conv4_shapes(ways: int = 5, filters: int = 64, in_channels: int = 1) -> list[Shape]:
    """4 x (conv weight, conv bias, BN weight, BN bias), then the linear head."""
    shapes: list[Shape] = []
    for c_in in (in_channels, filters, filters, filters):
        shapes += [(filters, c_in, 3, 3), (filters,), (filters,), (filters,)]
    return [*shapes, (ways, filters), (ways,)]


def resnet12_shapes(ways: int = 5, channels: Shape = (64, 160, 320, 640)) -> list[Shape]:
    """4 residual blocks of 3 conv3x3 + BN and a 1x1 conv + BN shortcut, then the head."""
    shapes: list[Shape] = []
    c_in = 3
    for c in channels:
        for c_conv in (c_in, c, c):
            shapes += [(c, c_conv, 3, 3), (c,), (c,)]
        shapes += [(c, c_in, 1, 1), (c,), (c,)]
        c_in = c
    return [*shapes, (ways, channels[-1]), (ways,)]


CONFIGS = [("conv4", conv4_shapes(), t) for t in (1, 8, 32)] + [("resnet12", resnet12_shapes(), 1)]


def loop(params, grads, lr):
    return [p - lr * g for p, g in zip(params, grads)]


def loop_per_element(params, grads, lrs):
    return [p - lr * g for p, g, lr in zip(params, grads, lrs)]


def foreach(params, grads, lr):
    return torch._foreach_add(params, grads, alpha=-lr)


def foreach_per_element(params, grads, lrs):
    return torch._foreach_addcmul(params, lrs, grads, value=-1)


# name: (op, per-element rates (Meta-SGD)?, the loop and the foreach op it is compared with)
VARIANTS = {
    "loop": (loop, False, "loop", "foreach"),
    "foreach": (foreach, False, "loop", "foreach"),
    "fused": (mamlext.fused_sgd, False, "loop", "foreach"),
    "loop meta-sgd": (loop_per_element, True, "loop meta-sgd", "foreach meta-sgd"),
    "foreach meta-sgd": (foreach_per_element, True, "loop meta-sgd", "foreach meta-sgd"),
    "fused meta-sgd": (mamlext.fused_sgd, True, "loop meta-sgd", "foreach meta-sgd"),
}


def step(op, mode: str, params, grads, lr, weights):
    if mode == "no_grad":
        with torch.no_grad():
            return op(params, grads, lr)
    outs = op(params, grads, lr)
    if mode == "fwd":
        return outs
    inputs = params + grads + (lr if isinstance(lr, list) else [])
    return torch.autograd.grad(outs, inputs, grad_outputs=weights)


def median_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    return medians_ms({"fn": fn}, device, warmup, repeats)["fn"]


def medians_ms(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """The median time in ms of each function, timed in turn within each repeat."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time_ms(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def _time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def count_kernels(fn, device: torch.device) -> int:
    """CUDA kernels launched by one call of ``fn`` (memcpy/memset excluded)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(
        e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
        for e in prof.events()
    )


COLUMNS: report.Columns = {
    "config": ("config", "{}"),
    "T": ("T", "{}"),
    "elements": ("elements", "{:,}"),
    "variant": ("variant", "{}"),
    "mode": ("mode", "{}"),
    "median_ms": ("median ms", "{:.4g}"),
    "vs_loop": ("vs loop", "{:.2f}x"),
    "vs_foreach": ("vs foreach", "{:.2f}x"),
    "gbps": ("GB/s", "{:.0f}"),
    "pct_copy": ("% of copy", "{:.0f}%"),
    "launches": ("launches", "{}"),
}
ROW = dict.fromkeys(COLUMNS)


def run(
    device: str = "cpu", quick: bool = False, dtype: torch.dtype | str = torch.float32
) -> list[dict]:
    """Time every (list, mode, variant); one dict per table row, keyed like ``COLUMNS``.

    On CUDA the first row is the device-to-device copy that bandwidths are compared with.
    ``dtype`` may be given by name (``"float32"``).
    """
    dev = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    warmup, repeats = (3, 10) if quick else (10, 100)
    rows = [measure_copy(dev, dtype, warmup, repeats)] if dev.type == "cuda" else []
    copy_gbps = rows[0]["gbps"] if rows else None
    for config, shapes, tasks in CONFIGS:
        rows += measure_list(config, shapes, tasks, dev, dtype, warmup, repeats, copy_gbps)
    return rows


def measure_copy(dev: torch.device, dtype: torch.dtype, warmup: int, repeats: int) -> dict:
    """``dst.copy_(src)`` of a large buffer: bytes read + written per second."""
    src = torch.randn(1 << 27, device=dev, dtype=dtype)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), dev, warmup, repeats)
    gbps = 2 * src.numel() * dtype.itemsize / ms / 1e6
    return dict(
        ROW,
        config="d2d copy",
        elements=src.numel(),
        variant="copy_",
        mode="no_grad",
        median_ms=ms,
        gbps=gbps,
        pct_copy=100.0,
    )


def measure_list(config, shapes, tasks, dev, dtype, warmup, repeats, copy_gbps) -> list[dict]:
    def make(requires_grad: bool = True) -> list[torch.Tensor]:
        return [
            torch.randn(tasks, *s, device=dev, dtype=dtype, requires_grad=requires_grad)
            for s in shapes
        ]

    params, grads, weights = make(), make(), make(requires_grad=False)
    # Meta-SGD: one learned rate per parameter element, shared by the tasks.
    rates = [(0.1 * torch.rand(s, device=dev, dtype=dtype)).requires_grad_() for s in shapes]
    numel = sum(p.numel() for p in params)
    with torch.no_grad():  # a benchmark of wrong results would be meaningless
        torch.testing.assert_close(mamlext.fused_sgd(params, grads, LR), loop(params, grads, LR))
    rows = []
    for mode in MODES:
        fns = {
            variant: partial(step, op, mode, params, grads, rates if per_element else LR, weights)
            for variant, (op, per_element, _, _) in VARIANTS.items()
        }
        medians = medians_ms(fns, dev, warmup, repeats)
        for variant, (_, per_element, loop_variant, foreach_variant) in VARIANTS.items():
            fn, ms = fns[variant], medians[variant]
            row = dict(
                ROW,
                config=config,
                T=tasks,
                elements=numel,
                variant=variant,
                mode=mode,
                median_ms=ms,
                vs_loop=medians[loop_variant] / ms,
                vs_foreach=medians[foreach_variant] / ms,
            )
            if copy_gbps is not None and mode != "fwd+bwd":
                moved = 3 * numel + (sum(r.numel() for r in rates) if per_element else 0)
                row["gbps"] = moved * dtype.itemsize / ms / 1e6
                row["pct_copy"] = 100 * row["gbps"] / copy_gbps
            if copy_gbps is not None and mode == "no_grad":
                row["launches"] = count_kernels(fn, dev)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table; the GPU-only columns only when some row has them."""
    return report.markdown_table(rows, COLUMNS)


def header(device: str) -> str:
    """The machine (:func:`mamlext.bench.report.machine_info`) and the parameter lists."""
    lines = [report.machine_info(device)]
    for name, shapes in (("conv4", conv4_shapes()), ("resnet12", resnet12_shapes())):
        elements = sum(torch.Size(s).numel() for s in shapes)
        lines.append(f"{name}: {len(shapes)} tensors, {elements:,} elements per task")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="few repeats (< 1 min on 2 cores)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"]
    )
    parser.add_argument("--csv", type=Path, help="also write the rows as CSV")
    parser.add_argument("--markdown", type=Path, help="also write the header and table")
    args = parser.parse_args(argv)

    header_lines = header(args.device) + f"\ndtype: {args.dtype}, quick: {args.quick}"
    print(header_lines, flush=True)
    rows = run(args.device, args.quick, getattr(torch, args.dtype))
    table = markdown(rows)
    print("\n" + table)
    if args.csv:
        report.write_table_csv(rows, args.csv, list(COLUMNS))
    if args.markdown:
        args.markdown.write_text(report.markdown_page(header_lines, table))
