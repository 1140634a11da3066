"""Meta-test: adapt to fresh tasks and measure the query metric, with a 95 % interval."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from mamlext.data.tasks import Batch
from mamlext.maml import MAML
from mamlext.modules.norm import STATELESS_POLICIES
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


QUERY_MODES = ("task", "one", "mixed")


def query_outputs(
    maml: MAML, xs, ys, xq, yq, num_steps: int | None, mode: str = "task", others=None
) -> torch.Tensor:
    """The query outputs ``[T, Nq, ...]`` after adapting to each task's support set.

    ``mode`` says what each query is predicted together with (docs/train_eval.md):
    ``"task"``, all the task's queries at once; ``"one"``, each query alone; ``"mixed"``,
    each query with the task's other queries replaced by those of another task, ``others``
    (query inputs ``[T, Nq, ...]`` of other tasks). The three agree for a policy whose
    predictions do not depend on the other queries.
    """
    if mode == "task":
        return maml(xs, ys, xq, yq, num_steps=num_steps)[1]
    if mode not in QUERY_MODES:
        raise ValueError(f"query mode must be one of {QUERY_MODES}, got {mode!r}")
    fast = maml.adapt(xs, ys, num_steps)
    columns = []
    for i in range(xq.shape[1]):
        if mode == "one":
            columns.append(maml.predict(fast, xq[:, i : i + 1], xs, num_steps)[:, 0])
        else:
            mixed = others.clone()
            mixed[:, i] = xq[:, i]
            columns.append(maml.predict(fast, mixed, xs, num_steps)[:, i])
    return torch.stack(columns, 1)


def evaluate(
    maml: MAML, sampler, num_tasks: int, batch_size: int, device: torch.device,
    regression: bool, num_steps: int | None = None, query_mode: str = "task",
    others_sampler=None,
) -> dict[str, float]:  # fmt: skip
    """Meta-test: adapt to ``num_tasks`` fresh tasks; mean metric and its 95% interval.

    ``query_mode``: see :func:`query_outputs`; ``"mixed"`` draws the other tasks' queries
    from ``others_sampler`` (so the tasks evaluated are those of ``"task"`` mode).
    """
    if query_mode == "mixed" and others_sampler is None:
        raise ValueError("query mode 'mixed' needs others_sampler, the other tasks' source")
    was_training = maml.training
    maml.eval()
    values = []
    with torch.no_grad():
        while len(values) < num_tasks:
            size = min(batch_size, num_tasks - len(values))
            xs, ys, xq, yq = to_device(sampler.sample(size), device)
            others = None
            if query_mode == "mixed":
                others = to_device(others_sampler.sample(size), device)[2]
            outputs = query_outputs(maml, xs, ys, xq, yq, num_steps, query_mode, others)
            values += task_metric(outputs, yq, regression).tolist()
    maml.train(was_training)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    steps = maml.num_test_steps if num_steps is None else num_steps
    ci95 = 1.96 * std / math.sqrt(len(values))
    return {"mean": mean, "ci95": ci95, "tasks": len(values), "steps": steps}


def evaluate_checkpoint(
    path: str, tasks: int = 600, steps: int | None = None, device: str = "cpu",
    bn: str | None = None, query_mode: str = "task", query: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Meta-test the run saved at ``path`` on ``tasks`` tasks of its test split.

    Args:
        bn: the BatchNorm policy at meta-test (default: the run's). Another policy than the
            run's may only be one that keeps no statistics (``transductive``, ``support``).
        query_mode: ``task``, ``one`` or ``mixed`` (:func:`query_outputs`).
        query: query examples per class (regression: points per task); default the run's.
    """
    state, config = load_run_checkpoint(path)
    config = dataclasses.replace(config, device=device)
    maml = build_maml(config).to(device)
    maml.load_state_dict(state["maml"])
    if bn is not None and bn != config.bn:
        if bn not in STATELESS_POLICIES:
            raise ValueError(
                f"--bn {bn!r}: the run trained bn={config.bn!r}; at meta-test only a policy "
                "that keeps no running statistics may replace it (transductive or support)"
            )
        maml.bn_policy.set(bn)
    if query is not None:
        config = dataclasses.replace(config, query=query)
    sampler = build_sampler(config, "test", config.seed + 1)
    result = evaluate(
        maml, sampler.spawn(0), tasks, config.meta_batch, torch.device(device), config.regression,
        steps, query_mode, sampler.spawn(1),
    )  # fmt: skip
    return {
        "checkpoint": str(path), "iteration": state["iteration"], "bn": maml.bn,
        "query_mode": query_mode, "query": config.query, **result,
    }  # fmt: skip
