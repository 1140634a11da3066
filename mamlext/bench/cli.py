"""``mamlext bench``'s command line: the peer table (with the op table), or ``--memory``."""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

from mamlext.bench import load, memory, op
from mamlext.bench.configs import CONFIGS, FLOAT64_CONFIGS
from mamlext.bench.peers import META_LR, PEERS, plan
from mamlext.bench.report import (
    EXACT_F32,
    dist_version,
    machine_info,
    markdown,
    markdown_page,
    package_line,
    plot,
    write_csv,
)
from mamlext.bench.worker import IMPORT_ROOT, run, timing_plan

DEFAULT_OUT = (
    "mamlext-bench"  # in the current folder; this repository's runs use benchmarks/results
)


def versions_line(peers: tuple[str, ...]) -> str:
    """mamlext's version (and commit), torch's, and those of the peer distributions."""
    versions = ", ".join(f"{d} {dist_version(d)}" for d in peers)
    return f"{package_line(IMPORT_ROOT)}, torch {torch.__version__}; {versions}"


def header(device: str, quick: bool, configs: list[str], load_processes: int = 0) -> str:
    """Machine, versions, commit, date, how each column is measured, the configs."""
    warmup, repeats = timing_plan(device, quick)
    cuda = torch.device(device).type == "cuda"
    lines = [
        op.header(device),
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
            op.header(device)
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
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help="folder for MD/CSV/PNG (default: %(default)s)"
    )
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
