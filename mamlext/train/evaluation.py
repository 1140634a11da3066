"""Meta-test: adapt to fresh tasks and measure the query metric, with a 95 % interval."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from mamlext.data.tasks import Batch
from mamlext.maml import MAML
from mamlext.train.build import build_maml, build_sampler
from mamlext.train.run_checkpoint import load_run_checkpoint


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
