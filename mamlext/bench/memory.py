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
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from mamlext.bench.configs import CONFIGS, make_batch
from mamlext.bench.op import median_ms
from mamlext.bench.peers import PEERS, PeerUnavailable, build_mamlext
from mamlext.bench.report import markdown_page, markdown_table, write_table_csv
from mamlext.bench.worker import (
    IMPORT_ROOT,
    MemoryMeter,
    proc_status_mb,
    worker_command,
    worker_env,
    worker_row,
)

CONFIG = "C"
STEPS = (1, 5, 10, 25, 50, 100)
MEMORY_PEERS = {
    "higher": PEERS["higher"],
    "torchopt": PEERS["torchopt"],
    "mamlext": PEERS["mamlext"],
    "mamlext (checkpoint auto)": PEERS["mamlext (checkpoint auto)"],
    "mamlext (checkpoint sqrt K)": None,  # built per K: inner_checkpoint=ceil(sqrt(K))
}


def _build(peer: str, cfg, batch):
    if peer == "mamlext (checkpoint sqrt K)":
        return build_mamlext(cfg, batch, inner_checkpoint=math.ceil(math.sqrt(cfg.steps)))
    return MEMORY_PEERS[peer](cfg, batch)


class SavedTensorMeter:
    """Saved-tensor hooks that track the bytes held for backward and their peak.

    Counted by storage: a storage saved by several graph nodes counts once, and is
    released when its last handle is. Independent of the memory allocator (unlike RSS).
    """

    def __init__(self) -> None:
        self.alive: dict[int, list[int]] = {}  # storage pointer: [handles, bytes]
        self.now = self.peak = 0

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        entry = self.alive.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.now += entry[1]
            self.peak = max(self.peak, self.now)
        entry[0] += 1
        return _Saved(self, key, tensor)

    def _release(self, key: int) -> None:
        entry = self.alive[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.alive[key]


class _Saved:
    def __init__(self, meter: SavedTensorMeter, key: int, tensor: torch.Tensor) -> None:
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self) -> None:
        self.meter._release(self.key)


def _unpack(saved: _Saved) -> torch.Tensor:
    return saved.tensor


def measure_saved(peer: str, steps: int, device: str) -> dict:
    """One row: the peak MB saved for backward over a meta-step on one task of config C."""
    cfg = dataclasses.replace(CONFIGS[CONFIG], steps=steps, tasks=1)
    row: dict = {"peer": peer, "steps": steps, "status": "ok"}
    try:
        built = _build(peer, cfg, make_batch(cfg, torch.device(device), torch.float32))
    except PeerUnavailable as error:
        return {**row, "status": "unavailable", "error": str(error)}
    meter = SavedTensorMeter()
    with meter.hooks():
        built.step()
    return {**row, "saved_mb": meter.peak / 2**20, "path": built.path}


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
    parser.add_argument("--saved", action="store_true", help="saved-for-backward bytes only")
    a = parser.parse_args(argv)
    try:
        row = (measure_saved if a.saved else measure)(a.peer, a.steps, a.device)
    except Exception as error:
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        row = {"peer": a.peer, "steps": a.steps, "status": "error", "error": message}
    print(json.dumps(row), flush=True)
    return 0


def run_worker(
    peer: str, steps: int, device: str, limit_mb: float, timeout: float, saved: bool = False
) -> dict:
    """One row from a fresh process, stopped when its RSS exceeds ``limit_mb``."""
    args = ["--memory-worker", peer, str(steps), "--device", device] + (
        ["--saved"] if saved else []
    )
    row = {"peer": peer, "steps": steps}
    # Output to files, not pipes: nothing reads a pipe while the loop below polls.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            worker_command(args), stdout=out, stderr=err, text=True, env=worker_env(),
            cwd=IMPORT_ROOT,
        )  # fmt: skip
        began, stopped = time.monotonic(), None
        while process.poll() is None:
            if (proc_status_mb("VmRSS", process.pid) or 0.0) > limit_mb:
                stopped = f"ran out of memory (RSS over the {limit_mb / 1024:.1f} GB limit)"
            elif time.monotonic() - began > timeout:
                stopped = f"timed out after {timeout:.0f} s"
            if stopped:
                process.kill()
                process.wait()
                return {**row, "status": "error", "error": stopped}
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        return worker_row(row, out.read(), err.read(), process.returncode)


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
    "saved_mb": ("saved for backward, peak MB (1 task)", "{:.1f}"),
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
        done = sorted(
            (r for r in rows if r["peer"] == peer and r.get("peak_mb")), key=lambda r: r["steps"]
        )
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


def main(args: argparse.Namespace, info: str, out: Path, device: str) -> list[str]:
    """Every (peer, K) row; writes ``memory_{kind}.md``, ``.csv``, ``.png`` into ``out``.

    ``args.saved``: instead, the peak bytes saved for backward on one task of the config
    (saved-tensor hooks, independent of the allocator): ``memory_saved_{kind}.*``.
    """
    kind = torch.device(device).type
    steps = args.steps or list(STEPS)
    peers = args.memory_peers or list(MEMORY_PEERS)
    limit = args.memory_limit * 1024 if args.memory_limit else default_limit_mb()
    timeout = args.timeout or 1800
    describe = dataclasses.replace(CONFIGS[CONFIG], steps=0).describe().replace(", 0 step(s)", "")
    info += f"\nconfig: {describe}, second order, K inner steps"
    if args.saved:
        info += (
            "\neach (peer, K) in a fresh process: one meta-step on a batch of one task; the "
            "peak of the bytes saved for backward alive at once (saved-tensor hooks, by storage)"
        )
    else:
        info += (
            "\neach (peer, K) in a fresh process: one warm-up meta-step at K = 1, then the "
            f"median of 3 meta-steps (K <= 5) or 1; memory limit {limit / 1024:.1f} GB, "
            f"timeout {timeout:.0f} s"
        )
    print(info, flush=True)
    rows = []
    for k in steps:
        for peer in peers:
            row = run_worker(peer, k, device, limit, timeout, saved=args.saved)
            rows.append(row)
            keys = ("median_ms", "peak_mb", "saved_mb", "error")
            shown = {key: row.get(key) for key in keys if row.get(key)}
            print(f"[K={k}] {peer}: {shown}", flush=True)
    table = markdown(rows)
    name = f"memory_saved_{kind}" if args.saved else f"memory_{kind}"
    what = "Memory saved for backward" if args.saved else "Peak memory and time"
    title = f"{what} against inner steps: config {CONFIG} ({kind})"
    (out / f"{name}.md").write_text(markdown_page(info, table, title))
    write_table_csv(rows, out / f"{name}.csv", [*COLUMNS, "status", "error"])
    written = [f"{name}.md", f"{name}.csv"]
    if not args.saved:
        plot(rows, out / f"{name}.png", title)
        written.append(f"{name}.png")
    print("\n" + table + "\n")
    return written
