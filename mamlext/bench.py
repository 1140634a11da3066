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
out gets a row with its error. The op microbenchmark (:mod:`mamlext.bench_op`) runs too.

    mamlext bench [--quick] [--device cpu|cuda] [--out benchmarks/results]
    python benchmarks/bench_maml.py [--quick] [--configs A C] [--peers higher mamlext]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mamlext
from mamlext import bench_op

META_LR = 1e-3
SEED_MODEL, SEED_BATCH = 0, 1
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
Layer = Callable[..., nn.Module]  # a layer class: nn.Conv2d, torchmeta's MetaConv2d, ...


# ---- configs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """A few-shot classification episode shape and the Conv-4 that learns it."""

    name: str
    ways: int
    shots: int
    query: int  # query examples per class
    tasks: int  # meta-batch size
    steps: int  # inner steps
    step_size: float
    filters: int = 64
    channels: int = 1
    size: int = 28
    about: str = ""

    def describe(self) -> str:
        return (
            f"{self.name}: {self.ways}-way {self.shots}-shot, {self.query} query/class, "
            f"{self.tasks} tasks, {self.steps} step(s) at {self.step_size}, Conv-4/"
            f"{self.filters} on {self.channels}x{self.size}x{self.size}"
            + (f" ({self.about})" if self.about else "")
        )


CONFIGS = {
    c.name: c
    for c in (
        Config("tiny", 5, 1, 1, 2, 1, 0.4, filters=8, about="for the tests"),
        Config("A", 5, 1, 1, 32, 1, 0.4, about="MAML paper, Omniglot"),
        Config("A5", 5, 1, 1, 32, 5, 0.4, about="A with 5 steps"),
        Config("B", 5, 1, 15, 16, 1, 0.4, about="torchmeta example"),
        Config("B5", 5, 1, 15, 16, 5, 0.4, about="B with 5 steps"),
        Config("C", 20, 1, 1, 16, 5, 0.1, about="MAML paper, Omniglot 20-way"),
        Config("mini", 5, 5, 15, 4, 5, 0.01, 32, 3, 84, about="miniImageNet-shaped"),
    )
}
FULL_CONFIGS = ("A", "A5", "B", "B5", "C", "mini")  # C already has 5 steps
QUICK_CONFIGS = ("A", "B", "C")
FLOAT64_CONFIGS = ("A",)  # float64 correctness too (cheap there)
EXACT_F32 = 1e-4  # float32 relative error below which a meta-gradient counts as exact


def conv4(cfg: Config, conv: Layer, norm: Layer, seq: Layer, linear: Layer) -> nn.Module:
    """4 x [conv3x3 (padding 1), BatchNorm, ReLU, MaxPool2d(2)], Flatten, Linear."""
    layers: list[nn.Module] = []
    channels, size = cfg.channels, cfg.size
    for _ in range(4):
        layers += [conv(channels, cfg.filters, 3, padding=1), norm(cfg.filters)]
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        channels, size = cfg.filters, size // 2
    return seq(*layers, nn.Flatten(), linear(cfg.filters * size * size, cfg.ways))


def seed_model(cfg: Config) -> nn.Module:
    """The plain ``nn`` Conv-4 whose weights every peer starts from."""
    torch.manual_seed(SEED_MODEL)
    return conv4(cfg, nn.Conv2d, nn.BatchNorm2d, nn.Sequential, nn.Linear)


def twin(
    cfg: Config, like: Tensor, conv: Layer, norm: Layer, seq: Layer, linear: Layer
) -> nn.Module:
    """A Conv-4 built from other layer classes, holding the seed model's weights."""
    model = conv4(cfg, conv, norm, seq, linear)
    missing, _ = model.load_state_dict(seed_model(cfg).state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"the seed model lacks {missing}")
    return model.to(like.device, like.dtype)


class Batch(NamedTuple):
    xs: Tensor  # [T, ways * shots, C, H, W]
    ys: Tensor  # [T, ways * shots], labels 0..ways-1
    xq: Tensor
    yq: Tensor


def make_batch(cfg: Config, device: torch.device, dtype: torch.dtype) -> Batch:
    """One random meta-batch, the same for every peer (drawn on the CPU, then moved)."""
    g = torch.Generator().manual_seed(SEED_BATCH)
    image = (cfg.channels, cfg.size, cfg.size)

    def split(per_class: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(cfg.tasks, cfg.ways * per_class, *image, generator=g)
        y = torch.arange(cfg.ways).repeat(per_class).expand(cfg.tasks, -1).contiguous()
        return x.to(device, dtype), y.to(device)

    return Batch(*split(cfg.shots), *split(cfg.query))


# ---- peers: each builds a step() closure and a meta_gradient() function -----------------


class PeerUnavailable(RuntimeError):
    """The peer's library cannot be imported here."""


class Peer(NamedTuple):
    step: Callable[[], None]  # one meta-training step (Adam on the meta-parameters)
    meta_gradient: Callable[[], list[Tensor]]  # the meta-gradients, weights unchanged
    path: str = ""  # which code path served it (mamlext: batched or per-task)


def make_peer(params: list[Tensor], backward: Callable[[], None], path: str = "") -> Peer:
    """``backward()`` accumulates the meta-gradient of the mean query loss into ``.grad``."""
    optimizer = torch.optim.Adam(params, lr=META_LR)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        backward()
        optimizer.step()

    def meta_gradient() -> list[Tensor]:
        optimizer.zero_grad(set_to_none=True)
        backward()
        return [p.grad.detach().clone() for p in params]

    return Peer(step, meta_gradient, path)


def _import(name: str):
    try:
        return __import__(name, fromlist=["_"])
    except Exception as error:
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        raise PeerUnavailable(f"not installed ({reason})") from error


def build_higher(cfg: Config, batch: Batch) -> Peer:
    """higher's ``innerloop_ctx`` per task, query loss / T backward per task (as users do)."""
    higher = _import("higher")
    model = seed_model(cfg).to(batch.xs.device, batch.xs.dtype)
    inner_opt = torch.optim.SGD(model.parameters(), lr=cfg.step_size)

    def backward() -> None:
        for t in range(cfg.tasks):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
                fmodel,
                diffopt,
            ):
                for _ in range(cfg.steps):
                    diffopt.step(F.cross_entropy(fmodel(batch.xs[t]), batch.ys[t]))
                (F.cross_entropy(fmodel(batch.xq[t]), batch.yq[t]) / cfg.tasks).backward()

    return make_peer(list(model.parameters()), backward)


def build_torchmeta(cfg: Config, batch: Batch) -> Peer:
    """torchmeta's Meta layers and ``gradient_update_parameters`` loop per task."""
    _import("mamlext.compat.torchmeta")  # makes torchmeta importable on current torch
    tm = _import("torchmeta.modules")
    update = _import("torchmeta.utils.gradient_based").gradient_update_parameters
    layers = (tm.MetaConv2d, tm.MetaBatchNorm2d, tm.MetaSequential, tm.MetaLinear)
    model = twin(cfg, batch.xs, *layers)

    def backward() -> None:
        for t in range(cfg.tasks):
            params = None
            for _ in range(cfg.steps):
                loss = F.cross_entropy(model(batch.xs[t], params=params), batch.ys[t])
                params = update(model, loss, params=params, step_size=cfg.step_size)
            query_loss = F.cross_entropy(model(batch.xq[t], params=params), batch.yq[t])
            (query_loss / cfg.tasks).backward()

    return make_peer(list(model.parameters()), backward)


def build_torch_func(cfg: Config, batch: Batch) -> Peer:
    """``functional_call`` + ``grad`` + ``vmap`` over tasks (BN without running stats).

    Its second-order meta-gradient through training-mode BatchNorm is wrong (FACTS.md,
    pytorch/functorch#534); the correctness column shows by how much.
    """
    model = twin(
        cfg,
        batch.xs,
        nn.Conv2d,
        lambda c: nn.BatchNorm2d(c, track_running_stats=False),
        nn.Sequential,
        nn.Linear,
    )
    func = torch.func

    def loss(params, x, y):
        return F.cross_entropy(func.functional_call(model, params, (x,)), y)

    def task_loss(params, xs, ys, xq, yq):
        for _ in range(cfg.steps):
            grads = func.grad(loss)(params, xs, ys)
            params = {n: p - cfg.step_size * grads[n] for n, p in params.items()}
        return loss(params, xq, yq)

    tasks_loss = func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))
    params = dict(model.named_parameters())

    def backward() -> None:
        tasks_loss(params, *batch).mean().backward()

    return make_peer(list(params.values()), backward)


def build_foreach(cfg: Config, batch: Batch) -> Peer:
    """A plain per-task autograd loop: ``functional_call``, ``torch._foreach_add`` update."""
    model = seed_model(cfg).to(batch.xs.device, batch.xs.dtype)
    names, params = zip(*model.named_parameters())

    def logits(fast, x):
        return torch.func.functional_call(model, dict(zip(names, fast)), (x,))

    def backward() -> None:
        for t in range(cfg.tasks):
            fast = list(params)
            for _ in range(cfg.steps):
                loss = F.cross_entropy(logits(fast, batch.xs[t]), batch.ys[t])
                grads = torch.autograd.grad(loss, fast, create_graph=True)
                fast = torch._foreach_add(fast, grads, alpha=-cfg.step_size)
            query_loss = F.cross_entropy(logits(fast, batch.xq[t]), batch.yq[t])
            (query_loss / cfg.tasks).backward()

    return make_peer(list(params), backward)


def build_learn2learn(cfg: Config, batch: Batch) -> Peer:
    """learn2learn's ``MAML`` wrapper: ``clone()`` and ``adapt()`` per task."""
    l2l = _import("learn2learn")
    model = seed_model(cfg).to(batch.xs.device, batch.xs.dtype)
    maml = l2l.algorithms.MAML(model, lr=cfg.step_size, first_order=False)

    def backward() -> None:
        for t in range(cfg.tasks):
            learner = maml.clone()
            for _ in range(cfg.steps):
                learner.adapt(F.cross_entropy(learner(batch.xs[t]), batch.ys[t]))
            (F.cross_entropy(learner(batch.xq[t]), batch.yq[t]) / cfg.tasks).backward()

    return make_peer(list(model.parameters()), backward)


def build_mamlext(cfg: Config, batch: Batch, batched: bool | str = "auto") -> Peer:
    """``mamlext.MAML`` over all tasks at once (``batched`` as given; path recorded)."""
    from mamlext import modules as mm

    layers = (mm.MetaConv2d, mm.MetaBatchNorm2d, mm.MetaSequential, mm.MetaLinear)
    model = twin(cfg, batch.xs, *layers)
    maml = mamlext.MAML(model, step_size=cfg.step_size, num_steps=cfg.steps, batched=batched)
    path = "batched" if maml.use_batched(batch.xs, batch.xq) else "per-task"

    def backward() -> None:
        maml.meta_backward(*batch)  # the training loop's call: per-pass backward

    return make_peer(list(model.parameters()), backward, path)


PEERS: dict[str, Callable[[Config, Batch], Peer]] = {
    "higher": build_higher,
    "torchmeta": build_torchmeta,
    "torch.func": build_torch_func,
    "foreach loop": build_foreach,
    "learn2learn": build_learn2learn,
    "mamlext": build_mamlext,
    "mamlext (batched)": lambda cfg, batch: build_mamlext(cfg, batch, batched=True),
    "mamlext (per-task)": lambda cfg, batch: build_mamlext(cfg, batch, batched=False),
}
QUICK_PEERS = ("higher", "torchmeta", "foreach loop", "mamlext", "torch.func")
NOTES = {
    "torch.func": "meta-gradient wrong through BatchNorm under vmap (FACTS.md, functorch#534)",
}


def plan(
    quick: bool, configs: Iterable[str] | None = None, peers: Iterable[str] | None = None
) -> list[tuple[str, str]]:
    """The (config, peer) pairs to measure, higher first in each config (the reference)."""
    configs = list(configs or (QUICK_CONFIGS if quick else FULL_CONFIGS))
    chosen = list(peers or (QUICK_PEERS if quick else PEERS))
    unknown = [c for c in configs if c not in CONFIGS] + [p for p in chosen if p not in PEERS]
    if unknown:
        raise ValueError(
            f"unknown configs or peers {unknown}; configs: {list(CONFIGS)}, peers: {list(PEERS)}"
        )
    ordered = [p for p in PEERS if p in chosen]
    ordered.sort(key=lambda p: p != "higher")
    return [
        (c, p)
        for c in configs
        for p in ordered
        if not (quick and peers is None and p == "torch.func" and c != "A")
    ]


# ---- the worker: one (config, peer) measurement in this process --------------------------


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
        self.baseline = _rss_mb()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _hwm_mb() if self.reset else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return peak - self.baseline


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def rel_error(grads: list[Tensor], reference: list[Tensor]) -> float:
    """``||g - g_ref|| / ||g_ref||`` over all tensors concatenated (computed in float64)."""
    g = torch.cat([x.detach().double().flatten().cpu() for x in grads])
    r = torch.cat([x.detach().double().flatten().cpu() for x in reference])
    return float((g - r).norm() / r.norm())


def reference_gradient(cfg: Config, batch: Batch, ref_dir: str | None) -> list[Tensor]:
    """higher's meta-gradient on ``batch``, cached in ``ref_dir`` for the other workers."""
    path = None
    if ref_dir:
        path = Path(ref_dir) / f"{cfg.name}_{str(batch.xs.dtype)[6:]}.pt"
        if path.exists():
            return torch.load(path, map_location=batch.xs.device)
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
    result["median_ms"] = bench_op.median_ms(built.step, dev, warmup, repeats)
    result["peak_mb"] = meter.peak_mb()
    result["path"] = built.path
    del built, batch
    try:
        result.update(correctness(cfg, peer, dev, ref_dir))
    except Exception as error:  # keep the timing; say why the check failed
        result["error"] = f"correctness check failed: {type(error).__name__}: {error}"
    return result


def _worker(argv: list[str]) -> int:
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


# ---- the parent: one subprocess per (config, peer) ---------------------------------------


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
    command = [sys.executable, "-m", "mamlext.bench", "--worker", config, peer]
    command += ["--device", device, "--warmup", str(warmup), "--repeats", str(repeats)]
    command += ["--ref-dir", ref_dir] if ref_dir else []
    path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    row = {"config": config, "peer": peer}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=PACKAGE_ROOT
        )
    except subprocess.TimeoutExpired:
        return {**row, "status": "error", "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {**row, "status": "error", "error": f"worker exited with {done.returncode}: {tail}"}


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
    if row.get("median_ms") is None:
        return row.get("error", "?")
    text = f"{row['median_ms']:.1f} ms, {row['peak_mb']:.0f} MB"
    if row.get("err_f32") is not None:
        text += f", rel. err. {row['err_f32']:.1e}"
    return text + (f" ({row['error']})" if row.get("error") else "")


def exact(row: dict) -> bool:
    """Whether the row's float32 meta-gradient was checked and agrees with higher's."""
    return row.get("err_f32") is not None and row["err_f32"] < EXACT_F32


def add_speedups(rows: list[dict]) -> list[dict]:
    """``speedup`` = higher's median / the peer's; ``best``: the fastest exact peer."""
    higher = {r["config"]: r.get("median_ms") for r in rows if r["peer"] == "higher"}
    for r in rows:
        base, ms = higher.get(r["config"]), r.get("median_ms")
        r["speedup"] = base / ms if base and ms else None
        r["best"] = False
    for config in {r["config"] for r in rows}:
        timed = [r for r in rows if r["config"] == config and r["speedup"] and exact(r)]
        if timed:
            max(timed, key=lambda r: r["speedup"])["best"] = True
    return rows


# ---- output ------------------------------------------------------------------------------

COLUMNS = {  # key: (header, format)
    "config": ("config", "{}"),
    "peer": ("peer", "{}"),
    "path": ("path", "{}"),
    "median_ms": ("median ms", "{:.1f}"),
    "speedup": ("speed-up vs higher", "{:.2f}x"),
    "peak_mb": ("peak MB", "{:.0f}"),
    "err_f32": ("rel. err. f32", "{:.1e}"),
    "err_f64": ("rel. err. f64", "{:.1e}"),
    "note": ("note", "{}"),
}


def _note(row: dict) -> str:
    return "; ".join(filter(None, [row.get("error"), NOTES.get(row["peer"])]))


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table; the best speed-up of an exact peer in bold."""
    keys = [k for k in COLUMNS if k == "note" or any(r.get(k) is not None for r in rows)]
    lines = [
        "| " + " | ".join(COLUMNS[k][0] for k in keys) + " |",
        "|" + "|".join("---" for _ in keys) + "|",
    ]
    for r in rows:
        cells = []
        for k in keys:
            value = _note(r) if k == "note" else r.get(k)
            cell = "" if value in (None, "") else COLUMNS[k][1].format(value)
            cells.append(f"**{cell}**" if k == "speedup" and r["best"] else cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CSV_FIELDS = [*COLUMNS, "best", "status"]  # numbers unformatted


def write_csv(rows: list[dict], path: Path) -> None:
    """One line per row, the numbers unformatted; ``note`` holds errors and flags."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "note": _note(r)} for r in rows)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars: speed-up vs higher per config (groups) and peer (bars); hatched: a
    peer whose meta-gradient is not exact somewhere."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    peers = [
        p
        for p in dict.fromkeys(r["peer"] for r in rows)
        if any(r["peer"] == p and r["speedup"] for r in rows)
    ]
    width = 0.8 / max(len(peers), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(configs) + 2), 4))
    for i, peer in enumerate(peers):
        values = {r["config"]: r["speedup"] for r in rows if r["peer"] == peer}
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(configs))]
        wrong = any(r["peer"] == peer and r["speedup"] and not exact(r) for r in rows)
        label = f"{peer} (meta-gradient not exact)" if wrong else peer
        ax.bar(
            xs,
            [values.get(c) or 0 for c in configs],
            width,
            label=label,
            hatch="//" if wrong else None,
        )
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(configs)), configs)
    ax.set_ylabel("speed-up vs higher (higher = 1)")
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=PACKAGE_ROOT,
            timeout=10,
        )
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header(device: str, quick: bool, configs: list[str]) -> str:
    """Machine, versions, commit, date, how each column is measured, the configs."""
    warmup, repeats = timing_plan(device, quick)
    cuda = torch.device(device).type == "cuda"
    peers = ", ".join(f"{d} {_version(d)}" for d in ("higher", "torchmeta", "learn2learn"))
    lines = [
        bench_op.machine_info(device),
        f"mamlext {mamlext.__version__} (commit {_git_commit()}), torch {torch.__version__}; "
        f"{peers}",
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}; mode: "
        f"{'quick' if quick else 'full'}",
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
    """``mamlext bench``: the peer table, CSV and chart, then the op microbenchmark."""
    started = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here")
    out, kind = Path(args.out), torch.device(device).type
    out.mkdir(parents=True, exist_ok=True)
    configs, peers = getattr(args, "configs", None), getattr(args, "peers", None)
    pairs = plan(args.quick, configs, peers)
    info = header(device, args.quick, list(dict.fromkeys(c for c, _ in pairs)))
    print(info, flush=True)

    rows = run(device, args.quick, configs, peers, getattr(args, "timeout", None))
    table = markdown(rows)
    title = f"# MAML meta-training step: mamlext vs peers ({kind})"
    (out / f"maml_{kind}.md").write_text(f"{title}\n\n{_md_lines(info)}\n\n{table}\n")
    write_csv(rows, out / f"maml_{kind}.csv")
    plot(rows, out / f"maml_{kind}.png", f"MAML step speed-up vs higher ({kind})")

    op_rows = bench_op.run(device, args.quick)
    op_table = bench_op.markdown(op_rows)
    op_info = bench_op.machine_info(device) + f"\ndtype: float32, quick: {args.quick}"
    (out / f"op_{kind}.md").write_text(
        f"# fused_sgd op ({kind})\n\n{_md_lines(op_info)}\n\n{op_table}\n"
    )

    print(f"\n{table}\n\n{op_table}\n")
    names = ", ".join(
        f"{stem}_{kind}.{ext}"
        for stem, ext in (("maml", "md"), ("maml", "csv"), ("maml", "png"), ("op", "md"))
    )
    print(f"wrote {names} in {out}/ ({time.perf_counter() - started:.0f} s)")
    return 0


def _md_lines(text: str) -> str:
    return text.replace("\n", "  \n")


def build_parser() -> argparse.ArgumentParser:
    """The options of ``mamlext bench`` plus selections for focused runs."""
    parser = argparse.ArgumentParser(description="MAML meta-training step: mamlext vs peers")
    parser.add_argument("--quick", action="store_true", help="CPU: configs A, B, C, minutes")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default="benchmarks/results", help="folder for MD/CSV/PNG")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="only these")
    parser.add_argument("--peers", nargs="+", choices=list(PEERS), help="only these")
    parser.add_argument("--timeout", type=float, help="seconds per (config, peer) subprocess")
    return parser


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(_worker(sys.argv[2:]))
    sys.exit(main(build_parser().parse_args()))
