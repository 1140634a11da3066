"""The training loop of ``mamlext train``: set up or resume a run, meta-train it step by step
with periodic evaluations and checkpoints, stop safely, evaluate at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from mamlext import distributed
from mamlext.maml import MAML
from mamlext.train.build import build_maml, build_sampler
from mamlext.train.config import TrainConfig, first_order_at, meta_lr_at, step_weights_at
from mamlext.train.evaluation import evaluate, task_metric, to_device
from mamlext.train.folder import exclusive_use
from mamlext.train.run_checkpoint import (
    CheckpointError,
    check_same_run,
    drop_metrics_after,
    load_run_checkpoint,
    save_checkpoint,
)


class RunStopped(RuntimeError):
    """The run stopped before its end (it diverged, or a file could not be written)."""


@dataclasses.dataclass
class TrainingRun:
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
    with exclusive_use(Path(config.out)) if world.is_main else contextlib.nullcontext():
        run = _set_up(config, world, *samplers)
        try:
            return _train(run)
        except OSError as error:  # e.g. a full disk; checkpoints are written atomically
            where = error.filename or run.out
            raise run.stopped(f"cannot write to {where}: {error.strerror or error}") from None


def _train(run: TrainingRun) -> dict[str, Any] | None:
    """The steps from ``run.start`` on, then the final evaluation (see :func:`train`)."""
    config = run.config
    if run.world.is_main:
        _start_metrics(run)
    bar = _ProgressBar(run.start, config, enabled=config.progress and run.world.is_main)
    for iteration in range(run.start, config.iterations):
        began = time.perf_counter()
        record = meta_step(run, iteration)
        _check_finite(run, record)
        run.seconds += time.perf_counter() - began
        bar.update(record["loss"], record[config.metric_name])
        _record_and_checkpoint(run, record)
    bar.close()
    run.world.close()
    return _final_evaluation(run) if run.world.is_main else None


def _build_samplers(config: TrainConfig, world: distributed.World) -> tuple[Any, Any]:
    """This rank's training tasks and the test split's tasks (the data is read here)."""
    world.share(config.meta_batch)  # at least one task per process
    sampler = build_sampler(config, "train", config.seed, rank=world.rank)
    return sampler, build_sampler(config, "test", config.seed + 1)


def _set_up(config: TrainConfig, world: distributed.World, sampler, eval_sampler) -> TrainingRun:
    """Model and optimizer of a new run, or of the checkpoint's run to resume."""
    torch.manual_seed(config.seed)
    maml = build_maml(config).to(world.device)
    world.broadcast_parameters(maml)
    optimizer = torch.optim.Adam(maml.parameters(), lr=config.meta_lr)
    run = TrainingRun(config, world, maml, optimizer, sampler, eval_sampler)
    if config.resume:
        _restore(run)
    return run


def _check_resumable(config: TrainConfig, world: distributed.World) -> dict[str, Any]:
    """The checkpoint in ``config.out``, refused unless this run can continue it."""
    state, saved = load_run_checkpoint(Path(config.out) / "checkpoint.pt")
    check_same_run(saved, config, state["iteration"])
    if len(state["samplers"]) != world.size:
        raise CheckpointError(
            f"the checkpoint was written by {len(state['samplers'])} process(es); resume "
            f"with the same number (now {world.size}) to continue every task stream"
        )
    return state


def _restore(run: TrainingRun) -> None:
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


def _start_metrics(run: TrainingRun) -> None:
    """A new run starts metrics.jsonl afresh; a resumed one keeps the checkpoint's records."""
    if run.config.resume:
        drop_metrics_after(run.metrics_path, run.start)
    else:
        run.metrics_path.unlink(missing_ok=True)


def _check_finite(run: TrainingRun, record: dict[str, Any]) -> None:
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


def meta_step(run: TrainingRun, iteration: int) -> dict[str, Any]:
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
    statistics = run.maml.bn_policy.statistics()  # the trained BatchNorm sets, if any
    world.average_gradients(run.maml, run.local_batch, statistics)  # weighted: exact if uneven
    run.optimizer.step()
    metric = world.mean(task_metric(outputs, yq, config.regression).mean(), run.local_batch)
    return {
        "iteration": iteration + 1,
        "loss": world.mean(loss, run.local_batch),
        config.metric_name: metric,
    }


def _record_and_checkpoint(run: TrainingRun, record: dict[str, Any]) -> None:
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


def _final_evaluation(run: TrainingRun) -> dict[str, Any]:
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
        from mamlext.train import plots

        result["plots"] = plots.write_all(
            run.out, run.metrics_path, run.maml, run.eval_sampler, config, run.world.device
        )
    return result


def _state(run: TrainingRun, sampler_states: list[Any], iteration: int) -> dict[str, Any]:
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
