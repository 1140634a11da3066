"""``mamlext bench``: one second-order MAML meta-training step, mamlext against its peers.

What is measured, for every (config, peer) pair, on one machine in one run:

* **step time**: one meta-training step = for every task, the inner loop on its support
  set (second order) and its query loss; the mean over tasks; backward; an Adam step
  (lr 1e-3) on the meta-parameters. The median over ``repeats`` steps after ``warmup``
  steps (``time.perf_counter`` on a CPU, CUDA events with synchronisation on a GPU).
  ``speed-up`` is higher's median over the peer's (> 1: faster than higher).
* **peak memory**: on a CPU the peak RSS increase over the RSS just before the first step
  (the kernel's high-water mark, reset before the first step through
  ``/proc/self/clear_refs``; ``ru_maxrss`` where that is impossible); on CUDA
  ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``.
* **correctness**: ``||g - g_higher|| / ||g_higher||`` over all meta-gradients
  concatenated, from the initial weights on the benchmark batch, in float32 (TF32 off),
  and in float64 for the configs of ``FLOAT64_CONFIGS``.

Every peer starts from the same weights (a seeded plain ``nn`` Conv-4 whose state_dict is
loaded into the others) and sees the same random batch; BatchNorm uses batch statistics.
Each pair runs in a fresh subprocess (``python -m mamlext.bench --worker CONFIG PEER``,
which prints one JSON line) so that its peak RSS is its own; a peer that fails or times
out gets a row with its error. The op microbenchmark (:mod:`mamlext.bench.op`) runs too.

Modules: ``configs`` (episode shapes, seed model, batch), ``peers`` (the peer builders and
the plan), ``worker`` (the subprocess worker and memory meter), ``report`` (tables, CSV,
chart, header lines of both benchmarks), ``op`` (the fused-op microbenchmark).

    mamlext bench [--quick] [--device cpu|cuda] [--out benchmarks/results]
    python benchmarks/bench_maml.py [--quick] [--configs A C] [--peers higher mamlext]
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

from mamlext.bench import load, memory, op
from mamlext.bench.configs import CONFIGS, FLOAT64_CONFIGS, FULL_CONFIGS, QUICK_CONFIGS, Config
from mamlext.bench.peers import META_LR, PEERS, QUICK_PEERS, PeerUnavailable, plan
from mamlext.bench.report import (
    EXACT_F32,
    add_speedups,
    dist_version,
    machine_info,
    markdown,
    markdown_page,
    package_line,
    plot,
    write_csv,
)
from mamlext.bench.worker import IMPORT_ROOT, run, run_worker, timing_plan

__all__ = [
    "CONFIGS",
    "FULL_CONFIGS",
    "PEERS",
    "QUICK_CONFIGS",
    "QUICK_PEERS",
    "Config",
    "PeerUnavailable",
    "add_speedups",
    "build_parser",
    "header",
    "main",
    "markdown",
    "plan",
    "plot",
    "run",
    "run_worker",
    "write_csv",
]


def versions_line(peers: tuple[str, ...]) -> str:
    """mamlext's version (and commit), torch's, and those of the peer distributions."""
    versions = ", ".join(f"{d} {dist_version(d)}" for d in peers)
    return f"{package_line(IMPORT_ROOT)}, torch {torch.__version__}; {versions}"


def header(device: str, quick: bool, configs: list[str], load_processes: int = 0) -> str:
    """Machine, versions, commit, date, how each column is measured, the configs."""
    warmup, repeats = timing_plan(device, quick)
    cuda = torch.device(device).type == "cuda"
    lines = [
        op.machine_info(device),
        versions_line(("higher", "torchmeta", "learn2learn", "torchopt")),
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}; mode: "
        f"{'quick' if quick else 'full'}",
        load.describe(load_processes),
        f"step time: median of {repeats} second-order meta-training steps (Adam, lr {META_LR}) "
        f"after {warmup} warm-up, {'CUDA events' if cuda else 'perf_counter'}; each peer in a "
        "fresh process",
        "peak MB: "
        + (
            "torch.cuda.max_memory_allocated over the steps"
            if cuda
            else "peak RSS increase over the RSS before the first step"
        ),
        "rel. err.: ||g - g_higher|| / ||g_higher|| of the meta-gradient from the initial "
        f"weights on the same batch, float32 (TF32 off); float64 for {', '.join(FLOAT64_CONFIGS)}",
        f"bold: the fastest peer whose meta-gradient is exact (rel. err. f32 < {EXACT_F32:g})",
        "configs:",
        *(f"- {CONFIGS[c].describe()}" for c in configs),
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``mamlext bench``: the peer table, CSV and chart, then the op microbenchmark.

    Writes ``maml_{cpu,cuda}.md``, ``.csv``, ``.png`` and ``op_{cpu,cuda}.md`` into
    ``args.out``, a folder relative to the current directory (created if missing).
    """
    started = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here")
    out, kind = Path(args.out), torch.device(device).type
    out.mkdir(parents=True, exist_ok=True)
    configs, peers = args.configs, args.peers
    pairs = plan(args.quick, configs, peers)
    load_processes = args.load
    if args.memory:
        info = "\n".join(
            [
                machine_info(device),
                versions_line(("higher", "torchopt")),
                f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
                load.describe(load_processes),
            ]
        )
        with load.background_load(load_processes):
            written = memory.main(args, info, out, device)
        print(f"wrote {', '.join(written)} in {out}/ ({time.perf_counter() - started:.0f} s)")
        return 0
    info = header(device, args.quick, list(dict.fromkeys(c for c, _ in pairs)), load_processes)
    print(info, flush=True)

    with load.background_load(load_processes):
        rows = run(device, args.quick, configs, peers, args.timeout)
        op_rows = None if args.skip_op else op.run(device, args.quick)
    table = markdown(rows)
    title = f"MAML meta-training step: mamlext vs peers ({kind})"
    (out / f"maml_{kind}.md").write_text(markdown_page(info, table, title))
    write_csv(rows, out / f"maml_{kind}.csv")
    plot(rows, out / f"maml_{kind}.png", f"MAML step speed-up vs higher ({kind})")
    written = [f"maml_{kind}.md", f"maml_{kind}.csv", f"maml_{kind}.png"]

    tables = [table]
    if op_rows is not None:
        op_table = op.markdown(op_rows)
        op_info = (
            op.machine_info(device)
            + f"\ndtype: float32, quick: {args.quick}\n{load.describe(load_processes)}"
        )
        page = markdown_page(op_info, op_table, f"fused_sgd op ({kind})")
        (out / f"op_{kind}.md").write_text(page)
        tables.append(op_table)
        written.append(f"op_{kind}.md")

    print("\n" + "\n\n".join(tables) + "\n")
    print(f"wrote {', '.join(written)} in {out}/ ({time.perf_counter() - started:.0f} s)")
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of ``mamlext bench`` (added to ``parser`` when given)."""
    if parser is None:
        parser = argparse.ArgumentParser(description="MAML meta-training step: mamlext vs peers")
    parser.add_argument("--quick", action="store_true", help="CPU: configs A, B, C, minutes")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default="benchmarks/results", help="folder for MD/CSV/PNG")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="only these")
    parser.add_argument("--peers", nargs="+", choices=list(PEERS), help="only these")
    parser.add_argument("--timeout", type=float, help="seconds per (config, peer) subprocess")
    parser.add_argument("--skip-op", action="store_true", help="no fused_sgd op benchmark")
    parser.add_argument(
        "--load",
        type=int,
        default=0,
        metavar="N",
        help="run N busy single-threaded background processes throughout (see bench/load.py)",
    )
    memory_options = parser.add_argument_group("--memory: peak memory against inner steps")
    memory_options.add_argument(
        "--memory", action="store_true", help="only the memory benchmark (bench/memory.py)"
    )
    memory_options.add_argument("--steps", type=int, nargs="+", help="inner steps K to sweep")
    memory_options.add_argument(
        "--saved", action="store_true", help="bytes saved for backward on one task, not RSS"
    )
    memory_options.add_argument("--memory-peers", nargs="+", choices=list(memory.MEMORY_PEERS))
    memory_options.add_argument(
        "--memory-limit", type=float, metavar="GB", help="stop a peer above this RSS"
    )
    return parser
