"""The meta-training job behind ``mamlext train``: data, MAML, progress, checkpoints, eval."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mamlext import distributed
from mamlext.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mamlext.data.tasks import Batch
from mamlext.inner_checkpoint import check_setting
from mamlext.maml import MAML
from mamlext.models import conv4, mlp
from mamlext.schedules import cosine, multi_step_weights

DATASETS = ("sinusoid", "harmonic", "omniglot")
ALGORITHMS = ("maml", "fomaml", "metasgd", "mamlpp", "anil")
META_LR_SCHEDULES = ("milestones", "cosine")
MAMLPP_MULTI_STEP_LOSS = 5000  # the paper's 10 epochs of 500 iterations (capped at the run)
CHECKPOINT_ENTRIES = ("iteration", "config", "maml", "optimizer", "samplers", "torch_rng")
OPTIONAL_ENTRIES = ("seconds",)  # absent from checkpoints of mamlext before 2026-12-01
LOCK_NAME = "train.lock"


class RunStopped(RuntimeError):
    """The run stopped before its end (it diverged, or a file could not be written)."""


class OutFolderInUse(RuntimeError):
    """Another ``mamlext train`` holds the output folder."""


def _resumable(default: Any) -> Any:
    """A :class:`TrainConfig` field that ``--resume`` may change.

    Every other field must equal the checkpoint's (:func:`_check_same_run`).
    """
    return dataclasses.field(default=default, metadata={"resumable": True})


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; ``None`` fields take the MAML paper's value for the data.

    Sinusoid: K=10 shots and queries, meta-batch 25, one step of 0.01, Adam 1e-3 (3000
    iterations by default, about a minute on 2 cores, where the paper trains 70,000).
    Omniglot: Conv-4 (64 filters, strided), 5-way meta-batch 32 / one step of 0.4,
    20-way meta-batch 16 / five steps of 0.1. Queries: as many as shots, per class on
    Omniglot (the paper's code, cbfinn/maml ``main.py``, samples 2K examples per class and
    splits them in two); one per class with ``algorithm="mamlpp"`` (MAML++'s configs).
    ``split_scheme`` as :func:`mamlext.data.omniglot.split_indices` ("vinyals": torchmeta's
    1028 training and 423 test characters; "maml": the paper's 1200 and 423).
    The outer learning rate (``meta_lr_schedule``) is ``"milestones"``: ``meta_lr`` times
    ``meta_lr_gamma`` per milestone passed (as ``torch.optim.lr_scheduler.MultiStepLR``; no
    milestones: constant, as the paper), or ``"cosine"``: annealed from ``meta_lr`` to
    ``meta_lr_min`` over the run.
    ``algorithm="mamlpp"`` is MAML++'s Omniglot configuration (Antoniou et al. 2019): 5
    inner steps at meta-train and meta-test, meta-batch 8, learned per-layer per-step rates
    from 0.1, per-step BatchNorm weights, the multi-step loss over the first
    5000 iterations (10 epochs of 500), second order, Adam 1e-3 cosine-annealed to 1e-5.
    Each of those fields, set explicitly, overrides it.
    Every ``eval_every`` iterations, ``periodic_eval_tasks`` test tasks are evaluated and a
    checkpoint is written; at the end, ``eval_tasks``. The fields declared ``_resumable`` may
    differ when a run is resumed; the others must equal the checkpoint's.
    """

    dataset: str = "sinusoid"
    data_root: str | None = _resumable(None)  # a run may move, e.g. to a GPU machine and back
    download: bool = _resumable(False)
    split_scheme: str = "vinyals"
    ways: int = 5
    shots: int | None = None
    query: int | None = None
    meta_batch: int | None = None
    inner_steps: int | None = None
    test_steps: int | None = None
    step_size: float | None = None
    first_order: bool = False
    algorithm: str = "maml"
    bn: str = "transductive"
    # MAML++ (--algorithm mamlpp turns each on; each may be set on its own)
    bn_per_step_weights: bool | None = None
    multi_step_loss: int | None = None  # iterations of the multi-step loss; 0: off
    multi_step_loss_floor: float = 0.03
    first_order_until: int = 0  # derivative-order annealing: first order before it
    # activation checkpointing of the inner loop (memory, not results): may change on resume
    inner_checkpoint: int | str | None = _resumable(None)
    meta_lr: float = 1e-3
    # The schedule may change on resume only after the checkpoint's iteration.
    meta_lr_schedule: str | None = _resumable(None)
    meta_lr_min: float = _resumable(1e-5)
    meta_lr_milestones: tuple[int, ...] = _resumable(())
    meta_lr_gamma: float = _resumable(0.1)
    iterations: int | None = _resumable(None)
    eval_every: int | None = _resumable(None)
    periodic_eval_tasks: int = _resumable(100)
    eval_tasks: int = _resumable(600)
    device: str = _resumable("cpu")
    seed: int = 0
    out: str = _resumable("runs/mamlext")
    resume: bool = _resumable(False)
    plot: bool = _resumable(True)
    progress: bool = _resumable(True)

    @property
    def regression(self) -> bool:
        """Sinusoid/harmonic regression (MSE); otherwise Omniglot classification (accuracy)."""
        return self.dataset != "omniglot"

    @property
    def metric_name(self) -> str:
        """The key of the per-task metric in the metrics records."""
        return "mse" if self.regression else "accuracy"

    def _check_schedules_and_mamlpp_pieces(self) -> None:
        if self.meta_lr_schedule not in META_LR_SCHEDULES:
            raise ValueError(
                f"unknown --meta-lr-schedule {self.meta_lr_schedule!r}; choose from "
                f"{', '.join(META_LR_SCHEDULES)}"
            )
        if self.meta_lr_schedule == "cosine" and self.meta_lr_milestones:
            raise ValueError("--meta-lr-milestones apply to --meta-lr-schedule milestones only")
        if not 0 <= self.meta_lr_min <= self.meta_lr:
            raise ValueError("--meta-lr-min must be in [0, --meta-lr]")
        if not 0 <= self.multi_step_loss <= self.iterations:
            raise ValueError(
                f"--multi-step-loss {self.multi_step_loss} must be in 0..--iterations "
                f"({self.iterations}): the iterations over which its weights anneal"
            )
        if not 0 <= self.multi_step_loss_floor <= 1:
            raise ValueError("--multi-step-loss-floor must be in [0, 1]")
        if self.multi_step_loss and self.inner_steps < 1:
            raise ValueError("--multi-step-loss needs --inner-steps >= 1")
        if self.multi_step_loss and self.inner_checkpoint is not None:
            raise ValueError(
                "--multi-step-loss needs every inner step's graph, which --inner-checkpoint "
                "does not keep: use one or the other"
            )
        if self.first_order_until < 0:
            raise ValueError("--first-order-until must be >= 0")

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` replaced by the paper's value, validated."""
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"unknown algorithm {self.algorithm!r}; choose from {', '.join(ALGORITHMS)}"
            )
        regression = self.regression
        wide = self.ways >= 20
        defaults = dict(
            shots=10 if regression else 1,
            meta_batch=25 if regression else (16 if wide else 32),
            inner_steps=1 if regression or not wide else 5,
            step_size=0.01 if regression else (0.1 if wide else 0.4),
            iterations=3000 if regression else 60000,
            eval_every=1000 if regression else 500,
            bn_per_step_weights=False,
            multi_step_loss=0,
            meta_lr_schedule="milestones",
        )
        if self.algorithm == "mamlpp":
            defaults.update(
                inner_steps=5, test_steps=5, meta_lr_schedule="cosine",
                multi_step_loss=MAMLPP_MULTI_STEP_LOSS,
            )  # fmt: skip
            if not regression:  # the paper's Omniglot setting (the sinusoid's MLP has no BN)
                # Batch statistics at meta-test too: the paper's code normalises with them
                # always (docs/mamlpp.md); bn="per_step" is the paper's text, and an option.
                # One query example per class whatever the shots: the reference repository's
                # experiment_config/omniglot_maml++_* set "num_target_samples": 1.
                defaults.update(meta_batch=8, step_size=0.1, bn_per_step_weights=True, query=1)
        values = {
            k: v if getattr(self, k) is None else getattr(self, k) for k, v in defaults.items()
        }
        config = dataclasses.replace(self, **values)
        if config.query is None:  # as many as the support: MAML's code samples 2K per class
            config.query = config.shots
        if self.algorithm == "mamlpp" and self.multi_step_loss is None:
            config.multi_step_loss = min(config.multi_step_loss, config.iterations)
        if config.test_steps is None:
            config.test_steps = 10 if regression else max(config.inner_steps, 3)
        config._check_schedules_and_mamlpp_pieces()
        if config.dataset == "omniglot" and config.data_root is None:
            raise ValueError(
                "--dataset omniglot needs --data-root DIR (add --download to fetch it)"
            )
        for name in (
            "shots", "query", "meta_batch", "iterations", "eval_every", "periodic_eval_tasks",
            "eval_tasks",
        ):  # fmt: skip
            if getattr(config, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if any(m < 1 for m in config.meta_lr_milestones) or config.meta_lr_gamma <= 0:
            raise ValueError("--meta-lr-milestones must be >= 1 and --meta-lr-gamma > 0")
        config.meta_lr_milestones = tuple(sorted(config.meta_lr_milestones))
        if config.ways < 2 and not config.regression:
            raise ValueError("--ways must be >= 2")
        try:
            check_setting(config.inner_checkpoint)
        except ValueError:
            raise ValueError(
                "--inner-checkpoint must be auto or a segment length in inner steps >= 1, got "
                f"{config.inner_checkpoint!r}"
            ) from None
        return config


def meta_lr_at(config: TrainConfig, iteration: int) -> float:
    """Outer learning rate of the step taken after ``iteration`` completed steps."""
    if config.meta_lr_schedule == "cosine":
        return cosine(config.meta_lr, config.meta_lr_min, iteration, config.iterations)
    passed = sum(iteration >= m for m in config.meta_lr_milestones)
    return config.meta_lr * config.meta_lr_gamma**passed


def first_order_at(config: TrainConfig, iteration: int) -> bool:
    """Whether the step after ``iteration`` completed steps is first order (FOMAML, or
    derivative-order annealing's first phase)."""
    fomaml = config.first_order or config.algorithm == "fomaml"
    return fomaml or iteration < config.first_order_until


def step_weights_at(config: TrainConfig, iteration: int) -> list[float] | None:
    """The multi-step loss's weights of the step after ``iteration`` steps (``None``: off)."""
    if not config.multi_step_loss:
        return None
    return multi_step_weights(
        config.inner_steps, iteration, config.multi_step_loss, config.multi_step_loss_floor
    )


def build_sampler(config: TrainConfig, split: str, seed: int, rank: int = 0):
    """The task sampler of ``split`` ("train" or "test")."""
    from mamlext.data.toy import Harmonic, Sinusoid

    if config.dataset == "sinusoid":
        return Sinusoid(config.shots, config.query, seed=seed, rank=rank)
    if config.dataset == "harmonic":
        return Harmonic(config.shots, config.query, seed=seed, rank=rank)
    from mamlext.data.omniglot import omniglot_tasks

    return omniglot_tasks(
        config.data_root, split, config.ways, config.shots, config.query,
        split_scheme=config.split_scheme, seed=seed, rank=rank, download=config.download,
    )  # fmt: skip


def build_maml(config: TrainConfig) -> MAML:
    """The paper's network for the data (1-40-40-1 MLP or Conv-4) in the config's MAML variant."""
    model = mlp() if config.regression else conv4(config.ways)
    modes = {"metasgd": "per_element", "mamlpp": "per_layer_per_step"}
    head = [name for name, _ in model.meta_named_parameters()][-2:]
    return MAML(
        model,
        step_size=config.step_size,
        num_steps=config.inner_steps,
        num_test_steps=config.test_steps,
        first_order=first_order_at(config, 0),
        loss_fn=F.mse_loss if config.regression else F.cross_entropy,
        step_size_mode=modes.get(config.algorithm, "fixed"),
        adapt_params=head if config.algorithm == "anil" else None,
        bn=config.bn,
        bn_per_step_weights=config.bn_per_step_weights,
        inner_checkpoint=config.inner_checkpoint,
    )


def to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(xs, ys, xq, yq)``: the support and query tensors of ``batch`` on ``device``."""
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    return tuple(t.to(device, non_blocking=True) for t in (xs, ys, xq, yq))


def task_metric(outputs: torch.Tensor, targets: torch.Tensor, regression: bool) -> torch.Tensor:
    """Per task: query MSE (regression) or accuracy (classification), ``[T]``."""
    if regression:
        return (outputs - targets).pow(2).flatten(1).mean(1)
    return (outputs.argmax(-1) == targets).double().flatten(1).mean(1)


def evaluate(
    maml: MAML, sampler, num_tasks: int, batch_size: int, device: torch.device,
    regression: bool, num_steps: int | None = None,
) -> dict[str, float]:  # fmt: skip
    """Meta-test: adapt to ``num_tasks`` fresh tasks; mean metric and its 95% interval."""
    was_training = maml.training
    maml.eval()
    values = []
    with torch.no_grad():
        while len(values) < num_tasks:
            xs, ys, xq, yq = to_device(
                sampler.sample(min(batch_size, num_tasks - len(values))), device
            )
            _, outputs = maml(xs, ys, xq, yq, num_steps=num_steps)
            values += task_metric(outputs, yq, regression).tolist()
    maml.train(was_training)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    steps = maml.num_test_steps if num_steps is None else num_steps
    ci95 = 1.96 * std / math.sqrt(len(values))
    return {"mean": mean, "ci95": ci95, "tasks": len(values), "steps": steps}


@dataclasses.dataclass
class _Run:
    """What the steps of a training run share (set up by :func:`_set_up`)."""

    config: TrainConfig  # resolved
    world: distributed.World
    maml: MAML
    optimizer: torch.optim.Optimizer
    sampler: Any  # this rank's training tasks
    eval_sampler: Any  # the test split's tasks
    start: int = 0  # iterations already done (a resumed run's checkpoint)
    checkpointed: int | None = None  # the iteration of this run's checkpoint on disk
    seconds: float = 0.0  # time in meta-steps so far, resumed sessions included

    def stopped(self, reason: str) -> RunStopped:
        """The error that stops the run for ``reason``, saying what is left on disk."""
        if self.checkpointed is None:
            return RunStopped(f"{reason}; no checkpoint of this run was written")
        return RunStopped(
            f"{reason}; the last checkpoint (iteration {self.checkpointed}) is intact"
        )

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def local_batch(self) -> int:
        """Tasks per step on this rank: its share of the meta-batch (sizes differ by <= 1)."""
        share = self.world.share(self.config.meta_batch)
        return share.stop - share.start


def train(config: TrainConfig) -> dict[str, Any] | None:
    """Meta-train, evaluate, write metrics/checkpoints/plots under ``config.out``.

    Returns the final evaluation (and where the files are); ``None`` on the other ranks
    of a distributed job, where only rank 0 evaluates, writes and locks ``config.out``.

    Raises:
        OutFolderInUse: another ``train`` is running on ``config.out``.
        RunStopped: the run diverged (a non-finite meta-loss or parameter; nothing of that
            iteration is written) or a file could not be written (e.g. a full disk). The
            checkpoint on disk is then the last good one.
        CheckpointError: ``resume`` and the checkpoint is unusable or of another run.
    """
    config = config.resolved()
    world = distributed.World.from_environment(config.device)
    # Everything that can refuse the command is checked before the output folder is
    # touched, so that a refused command leaves it as it was (no train.lock, no folder).
    samplers = _build_samplers(config, world)
    if config.resume:
        _check_resumable(config, world)
    with _exclusive_use(Path(config.out)) if world.is_main else contextlib.nullcontext():
        run = _set_up(config, world, *samplers)
        try:
            return _train(run)
        except OSError as error:  # e.g. a full disk; checkpoints are written atomically
            where = error.filename or run.out
            raise run.stopped(f"cannot write to {where}: {error.strerror or error}") from None


def _train(run: _Run) -> dict[str, Any] | None:
    """The steps from ``run.start`` on, then the final evaluation (see :func:`train`)."""
    config = run.config
    if run.world.is_main:
        _start_metrics(run)
    bar = _ProgressBar(run.start, config, enabled=config.progress and run.world.is_main)
    for iteration in range(run.start, config.iterations):
        began = time.perf_counter()
        record = _meta_step(run, iteration)
        _check_finite(run, record)
        run.seconds += time.perf_counter() - began
        bar.update(record["loss"], record[config.metric_name])
        _record_and_checkpoint(run, record)
    bar.close()
    run.world.close()
    return _final_evaluation(run) if run.world.is_main else None


@contextlib.contextmanager
def _exclusive_use(out: Path) -> Iterator[None]:
    """Hold a lock on ``out`` (``fcntl.flock`` on ``out/train.lock``) while the block runs.

    Raises OutFolderInUse where another process holds it. The kernel releases the lock when
    its process ends, however it ends, so a crashed run never leaves the folder locked. The
    file stays, naming its last holder (removing it would let two runs lock two files).
    """
    _check_writable(out)
    with open(out / LOCK_NAME, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a process"
            raise OutFolderInUse(
                f"{out} is in use by another mamlext train ({holder}); wait for it to end, "
                f"or choose another --out"
            ) from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield


def _build_samplers(config: TrainConfig, world: distributed.World) -> tuple[Any, Any]:
    """This rank's training tasks and the test split's tasks (the data is read here)."""
    world.share(config.meta_batch)  # at least one task per process
    sampler = build_sampler(config, "train", config.seed, rank=world.rank)
    return sampler, build_sampler(config, "test", config.seed + 1)


def _set_up(config: TrainConfig, world: distributed.World, sampler, eval_sampler) -> _Run:
    """Model and optimizer of a new run, or of the checkpoint's run to resume."""
    torch.manual_seed(config.seed)
    maml = build_maml(config).to(world.device)
    world.broadcast_parameters(maml)
    optimizer = torch.optim.Adam(maml.parameters(), lr=config.meta_lr)
    run = _Run(config, world, maml, optimizer, sampler, eval_sampler)
    if config.resume:
        _restore(run)
    return run


def _check_resumable(config: TrainConfig, world: distributed.World) -> dict[str, Any]:
    """The checkpoint in ``config.out``, refused unless this run can continue it."""
    state, saved = load_run_checkpoint(Path(config.out) / "checkpoint.pt")
    _check_same_run(saved, config, state["iteration"])
    if len(state["samplers"]) != world.size:
        raise CheckpointError(
            f"the checkpoint was written by {len(state['samplers'])} process(es); resume "
            f"with the same number (now {world.size}) to continue every task stream"
        )
    return state


def _restore(run: _Run) -> None:
    """Continue from the checkpoint: parameters, Adam, this rank's task stream, the torch RNG.

    Read again under the folder's lock (:func:`train` checked it before taking the lock).
    """
    state = _check_resumable(run.config, run.world)
    run.maml.load_state_dict(state["maml"])
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.sampler.load_state_dict(state["samplers"][run.world.rank])
        torch.set_rng_state(state["torch_rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"{run.checkpoint_path}: its optimizer, task stream or RNG state does not fit this "
            f"run ({type(error).__name__}: {error})"
        ) from None
    run.start = run.checkpointed = state["iteration"]
    run.seconds = state.get("seconds", 0.0)  # older checkpoints: this session's time only


def _start_metrics(run: _Run) -> None:
    """A new run starts metrics.jsonl afresh; a resumed one keeps the checkpoint's records."""
    if run.config.resume:
        _drop_metrics_after(run.metrics_path, run.start)
    else:
        run.metrics_path.unlink(missing_ok=True)


def _check_finite(run: _Run, record: dict[str, Any]) -> None:
    """Stop the run when the step's meta-loss, or a parameter or buffer after it, is not finite.

    Called before anything of the step is written, so the last checkpoint stays the last
    finite one. Every process sees the same loss and parameters, so all stop together.
    """
    tensors = [t for t in run.maml.state_dict().values() if t.is_floating_point()]
    if math.isfinite(record["loss"]) and torch.stack([t.isfinite().all() for t in tensors]).all():
        return
    if not math.isfinite(record["loss"]):
        problem = f"the meta-loss is {record['loss']}"
    else:
        name = next(n for n, t in run.maml.state_dict().items() if not t.isfinite().all())
        problem = f"the step made {name} non-finite"
    raise run.stopped(
        f"the run diverged at iteration {record['iteration']}: {problem} (try a lower "
        f"--meta-lr or --step-size); nothing of that iteration was written"
    )


def _meta_step(run: _Run, iteration: int) -> dict[str, Any]:
    """One outer step on a fresh meta-batch, gradients averaged over the processes.

    Returns the step's record: ``iteration`` (steps done), the query ``loss`` and metric
    (``mse`` or ``accuracy``), each the mean over the tasks of every process.
    """
    config, world = run.config, run.world
    xs, ys, xq, yq = to_device(run.sampler.sample(run.local_batch), world.device)
    for group in run.optimizer.param_groups:
        group["lr"] = meta_lr_at(config, iteration)
    run.optimizer.zero_grad(set_to_none=True)
    run.maml.first_order = first_order_at(config, iteration)
    loss, outputs = run.maml.meta_backward(  # per-task passes: low memory
        xs, ys, xq, yq, step_weights=step_weights_at(config, iteration)
    )
    world.average_gradients(run.maml, tasks=run.local_batch)  # weighted: exact if uneven
    run.optimizer.step()
    metric = world.mean(task_metric(outputs, yq, config.regression).mean(), run.local_batch)
    return {
        "iteration": iteration + 1,
        "loss": world.mean(loss, run.local_batch),
        config.metric_name: metric,
    }


def _record_and_checkpoint(run: _Run, record: dict[str, Any]) -> None:
    """Append the step's record to metrics.jsonl, with an evaluation and a checkpoint when due.

    Every ``eval_every`` steps and at the last, the record gets ``seconds`` (time in
    meta-steps so far, evaluations and checkpoints excluded, the sessions before a
    ``--resume`` included), ``meta_lr`` and ``eval`` (``periodic_eval_tasks`` test tasks),
    and the checkpoint is written after it.
    """
    config, step = run.config, record["iteration"]
    checkpointing = step % config.eval_every == 0 or step == config.iterations
    if checkpointing:
        record["seconds"] = run.seconds
        record["meta_lr"] = meta_lr_at(config, step - 1)
        record["eval"] = evaluate(
            run.maml, run.eval_sampler.spawn(step), config.periodic_eval_tasks,
            run.local_batch, run.world.device, config.regression,
        )  # fmt: skip
        sampler_states = run.world.gather_states(run.sampler)  # a collective: every rank joins
    if not run.world.is_main:
        return
    # The record first: a crash between the two leaves a record that resume drops.
    with open(run.metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if checkpointing:
        save_checkpoint(_state(run, sampler_states, step), run.checkpoint_path)
        run.checkpointed = step


def _final_evaluation(run: _Run) -> dict[str, Any]:
    """Meta-test on ``eval_tasks`` tasks (regression: before adaptation too); final.json, plots."""
    config = run.config

    def on_test_tasks(num_steps: int | None = None) -> dict[str, float]:
        return evaluate(
            run.maml, run.eval_sampler.spawn(0), config.eval_tasks, run.local_batch,
            run.world.device, config.regression, num_steps=num_steps,
        )  # fmt: skip

    result = {"config": dataclasses.asdict(config), "final": on_test_tasks(), "out": str(run.out)}
    if config.regression:
        result["before_adaptation"] = on_test_tasks(num_steps=0)
    (run.out / "final.json").write_text(json.dumps(result, indent=2))
    if config.plot:
        from mamlext import plots

        result["plots"] = plots.write_all(
            run.out, run.metrics_path, run.maml, run.eval_sampler, config, run.world.device
        )
    return result


def _state(run: _Run, sampler_states: list[Any], iteration: int) -> dict[str, Any]:
    """The checkpoint: everything :func:`_restore` needs (``config`` as a plain dict)."""
    return {
        "iteration": iteration,
        "config": dataclasses.asdict(run.config),
        "maml": run.maml.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "samplers": sampler_states,
        "torch_rng": torch.get_rng_state(),
        "seconds": run.seconds,
    }


def load_run_checkpoint(path: str | Path) -> tuple[dict[str, Any], TrainConfig]:
    """Read a checkpoint of ``mamlext train`` and check that it is one, whole and finite.

    Returns:
        The checkpoint (as :func:`_state` writes it) and its run's config, resolved.

    Raises:
        CheckpointError: the file is unreadable, or the message names the entry that is
            missing, unknown, of the wrong shape or not finite.
    """
    state = load_checkpoint(path)

    def refuse(problem: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a usable checkpoint of mamlext train: {problem}")

    missing = [k for k in CHECKPOINT_ENTRIES if k not in state]
    unknown = [k for k in state if k not in CHECKPOINT_ENTRIES + OPTIONAL_ENTRIES]
    if missing or unknown:
        raise refuse(f"entries missing {missing}, unknown {unknown}")
    saved = state["config"]
    if not isinstance(saved, dict):
        raise refuse(f"its config is a {type(saved).__name__}, not a dict")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = [k for k in saved if k not in fields]  # older checkpoints may lack new fields
    if unknown:
        raise refuse(f"its config has settings this mamlext does not know: {unknown}")
    try:
        config = TrainConfig(**saved).resolved()
        model = build_maml(config)
    except (TypeError, ValueError) as error:
        raise refuse(f"its config is invalid ({error})") from None
    if not isinstance(state["iteration"], int) or state["iteration"] < 0:
        raise refuse(f"iteration {state['iteration']!r} is not a count of steps")
    weights = state["maml"]
    expected = model.state_dict()
    if not isinstance(weights, dict) or weights.keys() != expected.keys():
        found = list(weights) if isinstance(weights, dict) else type(weights).__name__
        raise refuse(f"its model holds {found}, expected {list(expected)}")
    for name, tensor in expected.items():
        found = weights[name]
        if not isinstance(found, torch.Tensor) or found.shape != tensor.shape:
            shape = tuple(found.shape) if isinstance(found, torch.Tensor) else type(found).__name__
            raise refuse(f"{name} is {shape}, expected {tuple(tensor.shape)} for this config")
        if found.is_floating_point() and not found.isfinite().all():
            raise refuse(f"{name} is not finite (the run diverged)")
    params = list(model.parameters())  # the optimizer's order
    try:
        adam = state["optimizer"]["state"]
        moments = [(i, s[k]) for i, s in adam.items() for k in ("exp_avg", "exp_avg_sq")]
        fits = all(m.shape == params[i].shape for i, m in moments)
    except (KeyError, TypeError, IndexError, AttributeError):
        fits = False
    if not fits:
        raise refuse("its optimizer state does not fit the model's parameters")
    if not isinstance(state["samplers"], list) or not isinstance(state["torch_rng"], torch.Tensor):
        raise refuse("its task stream or RNG state is not what mamlext train writes")
    seconds = state.get("seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0:
        raise refuse(f"its training time {seconds!r} is not a number of seconds >= 0")
    return state, config


def _drop_metrics_after(path: Path, iteration: int) -> None:
    """Keep the records up to the checkpoint's iteration (an interrupted run wrote more)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] <= iteration:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut short by the interruption
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _check_same_run(before: TrainConfig, config: TrainConfig, iteration: int) -> None:
    """Refuse to resume with a non-resumable setting or an earlier schedule unlike the saved."""
    saved, current = dataclasses.asdict(before), dataclasses.asdict(config)
    fixed = [f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("resumable")]
    differ = {k: (saved[k], current[k]) for k in fixed if saved[k] != current[k]}
    changes = {0, *before.meta_lr_milestones, *config.meta_lr_milestones}
    if "cosine" in (before.meta_lr_schedule, config.meta_lr_schedule):
        changes = range(iteration)  # a cosine moves at every iteration
    if any(meta_lr_at(before, i) != meta_lr_at(config, i) for i in changes if i < iteration):
        differ["meta_lr schedule before iteration " + str(iteration)] = tuple(
            (c.meta_lr_schedule, list(c.meta_lr_milestones), c.meta_lr_gamma, c.meta_lr_min)
            for c in (before, config)
        )
    if differ:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differ.items())
        raise CheckpointError(
            f"--resume with different settings than the checkpoint's run ({details})"
        )


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"cannot write to the output folder {out}: {error.strerror}"
        ) from None


class _ProgressBar:
    """A tqdm bar showing the step's loss and a running mean of the training metric."""

    def __init__(self, start: int, config: TrainConfig, enabled: bool) -> None:
        from tqdm import tqdm

        self._label = "mse" if config.regression else "acc"
        self._running: float | None = None
        # disable=None: no bar when stderr is not a terminal (CI logs, nohup)
        self._bar = tqdm(
            total=config.iterations, initial=start, disable=None if enabled else True,
            desc="meta-train", dynamic_ncols=True,
        )  # fmt: skip

    def update(self, loss: float, metric: float) -> None:
        running = self._running
        self._running = metric if running is None else 0.95 * running + 0.05 * metric
        self._bar.set_postfix({"loss": f"{loss:.3f}", self._label: f"{self._running:.3f}"})
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def evaluate_checkpoint(
    path: str, tasks: int = 600, steps: int | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Meta-test the run saved at ``path`` on ``tasks`` tasks of its test split."""
    state, config = load_run_checkpoint(path)
    config = dataclasses.replace(config, device=device)
    maml = build_maml(config).to(device)
    maml.load_state_dict(state["maml"])
    sampler = build_sampler(config, "test", config.seed + 1)
    result = evaluate(
        maml, sampler.spawn(0), tasks, config.meta_batch, torch.device(device), config.regression,
        steps,
    )  # fmt: skip
    return {"checkpoint": str(path), "iteration": state["iteration"], **result}  # result: steps
