"""``mamlext bench --memory``: peak memory and time of a meta-step against the inner steps K.

For each peer and each ``K`` in ``--steps`` (default 1, 5, 10, 25, 50, 100), a fresh process
builds config C (MAML's Omniglot 20-way 1-shot: Conv-4/64, 16 tasks, second order) with
``K`` inner steps, warms up with one meta-step at ``K = 1`` and then measures meta-steps at
``K``: the median time (3 steps for ``K <= 5``, else 1) and the peak memory over them (the
peak RSS increase on a CPU, ``max_memory_allocated`` on CUDA, as the peer benchmark's
``MemoryMeter``). A process whose RSS passes ``--memory-limit`` is stopped and its row
says that it ran out; one that runs past ``--timeout`` says so too.

Peers: higher, TorchOpt's functional loop, mamlext storing the inner loop's graph, and
mamlext with ``inner_checkpoint="auto"`` and with ``inner_checkpoint=ceil(sqrt(K))``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from mamlext.bench.configs import CONFIGS, make_batch
from mamlext.bench.op import median_ms
from mamlext.bench.peers import PEERS, PeerUnavailable, build_mamlext
from mamlext.bench.report import markdown_page, markdown_table, write_table_csv
from mamlext.bench.worker import IMPORT_ROOT, MemoryMeter

CONFIG = "C"
STEPS = (1, 5, 10, 25, 50, 100)
MEMORY_PEERS = {
    "higher": PEERS["higher"],
    "torchopt": PEERS["torchopt"],
    "mamlext": PEERS["mamlext"],
    "mamlext (checkpoint auto)": partial(build_mamlext, inner_checkpoint="auto"),
    "mamlext (checkpoint sqrt K)": None,  # built per K: inner_checkpoint=ceil(sqrt(K))
}


def _build(peer: str, cfg, batch):
    if peer == "mamlext (checkpoint sqrt K)":
        return build_mamlext(cfg, batch, inner_checkpoint=math.ceil(math.sqrt(cfg.steps)))
    return MEMORY_PEERS[peer](cfg, batch)


def measure(peer: str, steps: int, device: str) -> dict:
    """One row: the median ms and peak MB of meta-steps with ``steps`` inner steps."""
    dev = torch.device(device)
    cfg = dataclasses.replace(CONFIGS[CONFIG], steps=steps)
    row: dict = {"peer": peer, "steps": steps, "status": "ok"}
    try:
        batch = make_batch(cfg, dev, torch.float32)
        _build(peer, dataclasses.replace(cfg, steps=1), batch).step()  # warm-up, K = 1
        built = _build(peer, cfg, batch)
    except PeerUnavailable as error:
        return {**row, "status": "unavailable", "error": str(error)}
    meter = MemoryMeter(dev)
    meter.start()
    row["median_ms"] = median_ms(built.step, dev, 0, 3 if steps <= 5 else 1)
    row["peak_mb"] = meter.peak_mb()
    row["ms_per_step"] = row["median_ms"] / max(steps, 1)
    row["path"] = built.path
    return row


def worker_main(argv: list[str]) -> int:
    """``python -m mamlext.bench --memory-worker PEER K [--device D]``: one JSON row."""
    parser = argparse.ArgumentParser(prog="python -m mamlext.bench --memory-worker")
    parser.add_argument("peer", choices=list(MEMORY_PEERS))
    parser.add_argument("steps", type=int)
    parser.add_argument("--device", default="cpu")
    a = parser.parse_args(argv)
    try:
        row = measure(a.peer, a.steps, a.device)
    except Exception as error:
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        row = {"peer": a.peer, "steps": a.steps, "status": "error", "error": message}
    print(json.dumps(row), flush=True)
    return 0


def run_worker(peer: str, steps: int, device: str, limit_mb: float, timeout: float) -> dict:
    """One row from a fresh process, stopped when its RSS exceeds ``limit_mb``."""
    command = [sys.executable, "-m", "mamlext.bench", "--memory-worker", peer, str(steps)]
    command += ["--device", device]
    path = os.pathsep.join(filter(None, [str(IMPORT_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    row = {"peer": peer, "steps": steps}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=IMPORT_ROOT,
    )  # fmt: skip
    began, stopped = time.monotonic(), None
    while process.poll() is None:
        if _rss_mb(process.pid) > limit_mb:
            stopped = f"ran out of memory (RSS over the {limit_mb / 1024:.1f} GB limit)"
        elif time.monotonic() - began > timeout:
            stopped = f"timed out after {timeout:.0f} s"
        if stopped:
            process.kill()
            process.wait()
            return {**row, "status": "error", "error": stopped}
        time.sleep(0.2)
    out, err = process.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = (err.strip().splitlines() or ["no output"])[-1]
    return {**row, "status": "error", "error": f"worker exited with {process.returncode}: {tail}"}


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # gone, or not Linux
        pass
    return 0.0


def default_limit_mb() -> float:
    """Three quarters of the machine's memory (``MemTotal``), or 16 GB where unknown."""
    try:
        with open("/proc/meminfo") as f:
            total_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
        return 0.75 * total_kb / 1024
    except (OSError, StopIteration):
        return 16 * 1024


COLUMNS = {
    "steps": ("K", "{}"),
    "peer": ("peer", "{}"),
    "path": ("path", "{}"),
    "median_ms": ("ms / meta-step", "{:.0f}"),
    "ms_per_step": ("ms / inner step", "{:.0f}"),
    "peak_mb": ("peak MB", "{:.0f}"),
    "note": ("note", "{}"),
}


def markdown(rows: list[dict]) -> str:
    return markdown_table([{**r, "note": r.get("error")} for r in rows], COLUMNS)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Peak memory and time per meta-step against K, one line per peer (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for peer in dict.fromkeys(r["peer"] for r in rows):
        done = sorted((r for r in rows if r["peer"] == peer and r.get("peak_mb")), key=_steps)
        if not done:
            continue
        ks = [r["steps"] for r in done]
        axes[0].plot(ks, [max(r["peak_mb"], 1) for r in done], marker="o", label=peer)
        axes[1].plot(ks, [r["median_ms"] / 1000 for r in done], marker="o", label=peer)
    for ax, label in zip(axes, ["peak memory (MB)", "time per meta-step (s)"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("inner steps K")
        ax.set_ylabel(label)
        ax.grid(True, which="both", lw=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _steps(row: dict) -> int:
    return row["steps"]


def main(args: argparse.Namespace, info: str, out: Path, device: str) -> list[str]:
    """Every (peer, K) row; writes ``memory_{kind}.md``, ``.csv``, ``.png`` into ``out``."""
    kind = torch.device(device).type
    steps = args.steps or list(STEPS)
    peers = args.memory_peers or list(MEMORY_PEERS)
    limit = args.memory_limit * 1024 if args.memory_limit else default_limit_mb()
    timeout = args.timeout or 1800
    describe = dataclasses.replace(CONFIGS[CONFIG], steps=0).describe().replace(", 0 step(s)", "")
    info += (
        f"\nconfig: {describe}, second order, K inner steps"
        f"\neach (peer, K) in a fresh process: one warm-up meta-step at K = 1, then the median "
        f"of 3 meta-steps (K <= 5) or 1; memory limit {limit / 1024:.1f} GB, timeout "
        f"{timeout:.0f} s"
    )
    print(info, flush=True)
    rows = []
    for k in steps:
        for peer in peers:
            row = run_worker(peer, k, device, limit, timeout)
            rows.append(row)
            shown = {key: row.get(key) for key in ("median_ms", "peak_mb", "error") if row.get(key)}
            print(f"[K={k}] {peer}: {shown}", flush=True)
    table = markdown(rows)
    title = f"Peak memory and time against inner steps: config {CONFIG} ({kind})"
    (out / f"memory_{kind}.md").write_text(markdown_page(info, table, title))
    write_table_csv(rows, out / f"memory_{kind}.csv", [*COLUMNS, "status", "error"])
    plot(rows, out / f"memory_{kind}.png", title)
    print("\n" + table + "\n")
    return [f"memory_{kind}.md", f"memory_{kind}.csv", f"memory_{kind}.png"]
