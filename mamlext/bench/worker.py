"""One (config, peer) measurement per fresh interpreter, and the loop that launches them.

The worker (``python -m mamlext.bench --worker CONFIG PEER``) times the peer's step, meters
its peak memory, checks its meta-gradient against higher's and prints one JSON line. A
fresh process per pair makes its peak RSS its own; a crash or a timeout becomes an error
row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

import mamlext
from mamlext.bench.configs import CONFIGS, FLOAT64_CONFIGS, Config, make_batch
from mamlext.bench.op import median_ms
from mamlext.bench.peers import PEERS, PeerUnavailable, build_higher, plan
from mamlext.bench.report import add_speedups
from mamlext.data.tasks import Batch
from mamlext.heap import resident_bytes

# The folder this mamlext was imported from (a source checkout, site-packages, ...): the
# workers import the same one.
IMPORT_ROOT = Path(mamlext.__file__).resolve().parent.parent


class MemoryMeter:
    """Peak memory of what follows ``start()``: RSS increase (CPU) or CUDA max allocated."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset, self.baseline = False, 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # "5": reset the peak RSS (high-water mark) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.baseline = resident_bytes() / 2**20

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = proc_status_mb("VmHWM") if self.reset else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return peak - self.baseline


def proc_status_mb(field: str, pid: int | str = "self") -> float | None:
    """A ``kB`` field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``) in MB; None if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # the process is gone, or no /proc here
        pass
    return None


def rel_error(grads: list[Tensor], reference: list[Tensor]) -> float:
    """``||g - g_ref|| / ||g_ref||`` over all tensors concatenated (computed in float64)."""
    g = torch.cat([x.detach().double().flatten().cpu() for x in grads])
    r = torch.cat([x.detach().double().flatten().cpu() for x in reference])
    return float((g - r).norm() / r.norm())


def reference_gradient(cfg: Config, batch: Batch, ref_dir: str | None) -> list[Tensor]:
    """higher's meta-gradient on ``batch``, cached in ``ref_dir`` for the other workers."""
    like = batch["train"][0]
    path = None
    if ref_dir:
        path = Path(ref_dir) / f"{cfg.name}_{str(like.dtype)[6:]}.pt"
        if path.exists():
            return torch.load(path, map_location=like.device)
    grads = build_higher(cfg, batch).meta_gradient()
    if path is not None:
        torch.save(grads, path)
    return grads


def correctness(cfg: Config, peer: str, device: torch.device, ref_dir: str | None) -> dict:
    """Relative meta-gradient error against higher, float32 (and float64 where listed)."""
    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32
    torch.backends.cudnn.allow_tf32 = False
    errors = {}
    dtypes = [torch.float32] + ([torch.float64] if cfg.name in FLOAT64_CONFIGS else [])
    for dtype in dtypes:
        batch = make_batch(cfg, device, dtype)
        reference = reference_gradient(cfg, batch, ref_dir)
        grads = PEERS[peer](cfg, batch).meta_gradient()
        errors["err_f32" if dtype == torch.float32 else "err_f64"] = rel_error(grads, reference)
    return errors


def measure(
    config: str, peer: str, device: str, warmup: int, repeats: int, ref_dir: str | None = None
) -> dict:
    """Time ``repeats`` steps after ``warmup``, their peak memory, then the correctness."""
    cfg, dev = CONFIGS[config], torch.device(device)
    result: dict = {"config": config, "peer": peer, "status": "ok"}
    try:
        batch = make_batch(cfg, dev, torch.float32)
        built = PEERS[peer](cfg, batch)
    except PeerUnavailable as error:
        return {**result, "status": "unavailable", "error": str(error)}
    meter = MemoryMeter(dev)
    meter.start()
    result["median_ms"] = median_ms(built.step, dev, warmup, repeats)
    result["peak_mb"] = meter.peak_mb()
    result["path"] = built.path
    del built, batch
    try:
        result.update(correctness(cfg, peer, dev, ref_dir))
    except Exception as error:  # keep the timing; say why the check failed
        result["error"] = f"correctness check failed: {type(error).__name__}: {error}"
    return result


def worker_main(argv: list[str]) -> int:
    """``python -m mamlext.bench --worker CONFIG PEER [...]``: print one JSON row."""
    parser = argparse.ArgumentParser(prog="python -m mamlext.bench --worker")
    parser.add_argument("config", choices=list(CONFIGS))
    parser.add_argument("peer", choices=list(PEERS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref-dir")
    a = parser.parse_args(argv)
    try:
        result = measure(a.config, a.peer, a.device, a.warmup, a.repeats, a.ref_dir)
    except Exception as error:
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        result = {"config": a.config, "peer": a.peer, "status": "error", "error": message}
    print(json.dumps(result), flush=True)
    return 0


def run_worker(
    config: str,
    peer: str,
    device: str,
    warmup: int,
    repeats: int,
    ref_dir: str | None = None,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> dict:
    """Measure one pair in a fresh interpreter; a crash or a timeout becomes an error row.

    ``env``: extra environment variables of the worker (e.g. ``OMP_NUM_THREADS``).
    """
    command = ["--worker", config, peer]
    command += ["--device", device, "--warmup", str(warmup), "--repeats", str(repeats)]
    command += ["--ref-dir", ref_dir] if ref_dir else []
    row = {"config": config, "peer": peer}
    try:
        done = subprocess.run(
            worker_command(command), capture_output=True, text=True, timeout=timeout,
            env=worker_env(env), cwd=IMPORT_ROOT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {**row, "status": "error", "error": f"timed out after {timeout:.0f} s"}
    return worker_row(row, done.stdout, done.stderr, done.returncode)


def worker_command(args: list[str]) -> list[str]:
    """``python -m mamlext.bench ARGS``: a worker of the benchmark in a fresh interpreter."""
    return [sys.executable, "-m", "mamlext.bench", *args]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, importing the same mamlext (:data:`IMPORT_ROOT`), plus ``extra``."""
    path = os.pathsep.join(filter(None, [str(IMPORT_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def worker_row(row: dict, stdout: str, stderr: str, returncode: int) -> dict:
    """The worker's JSON row (its last ``{`` line), or ``row`` with its exit and last error line."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return {**row, "status": "error", "error": f"worker exited with {returncode}: {tail}"}


def timing_plan(device: str, quick: bool) -> tuple[int, int]:
    """(warm-up steps, timed steps)."""
    if torch.device(device).type == "cuda":
        return (3, 10) if quick else (3, 30)
    return (1, 3) if quick else (2, 7)


def run(
    device: str,
    quick: bool,
    configs: Iterable[str] | None = None,
    peers: Iterable[str] | None = None,
    timeout: float | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> list[dict]:
    """Measure every planned pair, each in its own subprocess; rows with speed-ups."""
    warmup, repeats = timing_plan(device, quick)
    timeout = timeout or (180 if quick else 1200)
    unavailable: dict[str, dict] = {}  # a library that did not import is not retried
    rows = []
    with tempfile.TemporaryDirectory(prefix="mamlext-bench-") as ref_dir:
        for config, peer in plan(quick, configs, peers):
            if peer in unavailable:
                row = {**unavailable[peer], "config": config}
            else:
                row = run_worker(config, peer, device, warmup, repeats, ref_dir, timeout)
            if row.get("status") == "unavailable":
                unavailable[peer] = row
            rows.append(row)
            log(f"[{config}] {peer}: {summary(row)}")
    return add_speedups(rows)


def summary(row: dict) -> str:
    """One log line's worth of a row: time, memory, error."""
    if row.get("median_ms") is None:
        return row.get("error", "?")
    text = f"{row['median_ms']:.1f} ms, {row['peak_mb']:.0f} MB"
    if row.get("err_f32") is not None:
        text += f", rel. err. {row['err_f32']:.1e}"
    return text + (f" ({row['error']})" if row.get("error") else "")
