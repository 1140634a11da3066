"""The meta-training job behind ``mamlext train``: data, MAML, progress, checkpoints, eval."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mamlext import distributed
from mamlext.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mamlext.data.tasks import Batch
from mamlext.maml import MAML
from mamlext.models import conv4, mlp

DATASETS = ("sinusoid", "harmonic", "omniglot")
ALGORITHMS = ("maml", "fomaml", "metasgd", "mamlpp", "anil")


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; ``None`` fields take the MAML paper's value for the data.

    Sinusoid: K=10 shots and queries, meta-batch 25, one step of 0.01, Adam 1e-3 (3000
    iterations by default, about a minute on 2 cores, where the paper trains 70,000).
    Omniglot: Conv-4 (64 filters, strided), 5-way meta-batch 32 / one step of 0.4,
    20-way meta-batch 16 / five steps of 0.1, one query per class; ``split_scheme`` as
    :func:`mamlext.data.omniglot.split_indices` ("vinyals": torchmeta's 1028 training and
    423 test characters; "maml": the paper's 1200 and 423).
    The outer learning rate is ``meta_lr`` times ``meta_lr_gamma`` per milestone passed
    (as ``torch.optim.lr_scheduler.MultiStepLR``); no milestones: constant, as the paper.
    """

    dataset: str = "sinusoid"
    data_root: str | None = None
    download: bool = False
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
    meta_lr: float = 1e-3
    meta_lr_milestones: tuple[int, ...] = ()
    meta_lr_gamma: float = 0.1
    iterations: int | None = None
    eval_every: int | None = None
    eval_tasks: int = 600
    device: str = "cpu"
    seed: int = 0
    out: str = "runs/mamlext"
    resume: bool = False
    plot: bool = True
    progress: bool = True

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` replaced by the paper's value, validated."""
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"unknown algorithm {self.algorithm!r}; choose from {', '.join(ALGORITHMS)}"
            )
        regression = self.dataset != "omniglot"
        wide = self.ways >= 20
        defaults = dict(
            shots=10 if regression else 1,
            query=10 if regression else 1,
            meta_batch=25 if regression else (16 if wide else 32),
            inner_steps=1 if regression or not wide else 5,
            step_size=0.01 if regression else (0.1 if wide else 0.4),
            iterations=3000 if regression else 60000,
            eval_every=1000 if regression else 500,
        )
        values = {
            k: v if getattr(self, k) is None else getattr(self, k) for k, v in defaults.items()
        }
        config = dataclasses.replace(self, **values)
        if config.test_steps is None:
            config.test_steps = 10 if regression else max(config.inner_steps, 3)
        if config.dataset == "omniglot" and config.data_root is None:
            raise ValueError(
                "--dataset omniglot needs --data-root DIR (add --download to fetch it)"
            )
        for name in ("shots", "query", "meta_batch", "iterations", "eval_every", "eval_tasks"):
            if getattr(config, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if any(m < 1 for m in config.meta_lr_milestones) or config.meta_lr_gamma <= 0:
            raise ValueError("--meta-lr-milestones must be >= 1 and --meta-lr-gamma > 0")
        config.meta_lr_milestones = tuple(sorted(config.meta_lr_milestones))
        if config.ways < 2 and not regression:
            raise ValueError("--ways must be >= 2")
        return config


def meta_lr_at(config: TrainConfig, iteration: int) -> float:
    """Outer learning rate of the step taken after ``iteration`` completed steps."""
    passed = sum(iteration >= m for m in config.meta_lr_milestones)
    return config.meta_lr * config.meta_lr_gamma**passed


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
    regression = config.dataset != "omniglot"
    model = mlp() if regression else conv4(config.ways)
    modes = {"metasgd": "per_element", "mamlpp": "per_layer_per_step"}
    head = [name for name, _ in model.meta_named_parameters()][-2:]
    return MAML(
        model,
        step_size=config.step_size,
        num_steps=config.inner_steps,
        num_test_steps=config.test_steps,
        first_order=config.first_order or config.algorithm == "fomaml",
        loss_fn=F.mse_loss if regression else F.cross_entropy,
        step_size_mode=modes.get(config.algorithm, "fixed"),
        adapt_params=head if config.algorithm == "anil" else None,
        bn=config.bn,
    )


def to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, ...]:
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


def train(config: TrainConfig) -> dict[str, Any] | None:
    """Meta-train, evaluate, write metrics/checkpoints/plots under ``config.out``.

    Returns the final evaluation (and where the files are); ``None`` on the other ranks
    of a distributed job, where only rank 0 evaluates and writes.
    """
    config = config.resolved()
    world = distributed.World.from_environment(config.device)
    device = world.device
    out = Path(config.out)
    if world.is_main:
        _check_writable(out)
    torch.manual_seed(config.seed)
    maml = build_maml(config).to(device)
    world.broadcast_parameters(maml)
    optimizer = torch.optim.Adam(maml.parameters(), lr=config.meta_lr)
    if config.meta_batch % world.size:
        raise ValueError(
            f"--meta-batch {config.meta_batch} does not split evenly over {world.size} processes"
        )
    local_batch = config.meta_batch // world.size
    sampler = build_sampler(config, "train", config.seed, rank=world.rank)
    eval_sampler = build_sampler(config, "test", config.seed + 1)
    regression = config.dataset != "omniglot"

    checkpoint_path = out / "checkpoint.pt"
    start = 0
    if config.resume:
        state = load_checkpoint(checkpoint_path)
        _check_same_run(state["config"], config, state["iteration"])
        if len(state["samplers"]) != world.size:
            raise CheckpointError(
                f"the checkpoint was written by {len(state['samplers'])} process(es); resume "
                f"with the same number (now {world.size}) to continue every task stream"
            )
        maml.load_state_dict(state["maml"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["samplers"][world.rank])
        torch.set_rng_state(state["torch_rng"])
        start = state["iteration"]
    metrics_path = out / "metrics.jsonl"
    if world.is_main and not config.resume:
        metrics_path.unlink(missing_ok=True)
    elif world.is_main:
        _drop_metrics_after(metrics_path, start)

    progress = _progress(start, config.iterations, enabled=config.progress and world.is_main)
    running = None
    began = time.perf_counter()
    for iteration in range(start, config.iterations):
        xs, ys, xq, yq = to_device(sampler.sample(local_batch), device)
        meta_lr = meta_lr_at(config, iteration)
        for group in optimizer.param_groups:
            group["lr"] = meta_lr
        optimizer.zero_grad(set_to_none=True)
        loss, outputs = maml.meta_backward(xs, ys, xq, yq)  # per-task passes: low memory
        world.average_gradients(maml)
        optimizer.step()
        metric = world.mean(task_metric(outputs, yq, regression).mean())
        loss_value = world.mean(loss)
        running = metric if running is None else 0.95 * running + 0.05 * metric
        progress.set_postfix(
            {"loss": f"{loss_value:.3f}", "mse" if regression else "acc": f"{running:.3f}"}
        )
        progress.update(1)
        step = iteration + 1
        record = {
            "iteration": step,
            "loss": loss_value,
            ("mse" if regression else "accuracy"): metric,
        }
        checkpointing = step % config.eval_every == 0 or step == config.iterations
        if checkpointing:
            record["seconds"] = time.perf_counter() - began  # training time, before this eval
            record["meta_lr"] = meta_lr
            record["eval"] = evaluate(
                maml, eval_sampler.spawn(step), 100, local_batch, device, regression
            )
            sampler_states = world.gather_states(sampler)  # a collective: every rank joins
        if world.is_main:
            # The record first: a crash between the two leaves a record that resume drops.
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if checkpointing:
                save_checkpoint(
                    _state(config, maml, optimizer, sampler_states, step), checkpoint_path
                )
    progress.close()
    world.close()
    if not world.is_main:
        return None

    final = evaluate(
        maml, eval_sampler.spawn(0), config.eval_tasks, local_batch, device, regression
    )
    result = {"config": dataclasses.asdict(config), "final": final, "out": str(out)}
    if regression:
        result["before_adaptation"] = evaluate(
            maml,
            eval_sampler.spawn(0),
            config.eval_tasks,
            local_batch,
            device,
            regression,
            num_steps=0,
        )
    if world.is_main:
        (out / "final.json").write_text(json.dumps(result, indent=2))
        if config.plot:
            from mamlext import plots

            result["plots"] = plots.write_all(out, metrics_path, maml, eval_sampler, config, device)
    return result


def _state(config, maml, optimizer, sampler_states, iteration) -> dict[str, Any]:
    return {
        "iteration": iteration,
        "config": dataclasses.asdict(config),
        "maml": maml.state_dict(),
        "optimizer": optimizer.state_dict(),
        "samplers": sampler_states,
        "torch_rng": torch.get_rng_state(),
    }


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


# Settings a resumed run may change (the rest must match the checkpoint's run; the
# learning-rate schedule may change only after the checkpoint's iteration). data_root and
# out may change so that a run can move, e.g. to a GPU machine and back.
_RESUMABLE = {
    "data_root",
    "out",
    "meta_lr_milestones",
    "meta_lr_gamma",
    "iterations",
    "resume",
    "progress",
    "plot",
    "eval_every",
    "eval_tasks",
    "device",
    "download",
}


def _check_same_run(saved: dict[str, Any], config: TrainConfig, iteration: int) -> None:
    current = dataclasses.asdict(config)
    defaults = dataclasses.asdict(TrainConfig())
    saved = {k: saved.get(k, defaults[k]) for k in current}  # older checkpoints lack new keys
    differ = {k: (saved[k], v) for k, v in current.items() if k not in _RESUMABLE and saved[k] != v}
    before = TrainConfig(**saved)
    changes = {0, *before.meta_lr_milestones, *config.meta_lr_milestones}
    if any(meta_lr_at(before, i) != meta_lr_at(config, i) for i in changes if i < iteration):
        differ["meta_lr schedule before iteration " + str(iteration)] = (
            (list(before.meta_lr_milestones), before.meta_lr_gamma),
            (list(config.meta_lr_milestones), config.meta_lr_gamma),
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


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs, nohup)
    disable = None if enabled else True
    return tqdm(total=total, initial=start, disable=disable, desc="meta-train", dynamic_ncols=True)


def evaluate_checkpoint(
    path: str, tasks: int = 600, steps: int | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Meta-test the run saved at ``path`` on ``tasks`` tasks of its test split."""
    state = load_checkpoint(path)
    config = TrainConfig(**{**state["config"], "device": device}).resolved()
    maml = build_maml(config).to(device)
    maml.load_state_dict(state["maml"])
    sampler = build_sampler(config, "test", config.seed + 1)
    regression = config.dataset != "omniglot"
    result = evaluate(
        maml, sampler.spawn(0), tasks, config.meta_batch, torch.device(device), regression, steps
    )
    return {
        "checkpoint": str(path),
        "iteration": state["iteration"],
        "steps": steps or config.test_steps,
        **result,
    }
