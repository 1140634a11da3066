"""The loss of each task, for the support sets (inner loop) and the query sets: one call over
all tasks where the loss allows it, else one call per task."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[..., Tensor]


class TaskLoss:
    """``loss_fn`` of one task's outputs and targets, or of all ``T`` tasks at once.

    Args:
        loss_fn: ``loss_fn(outputs, targets)`` of one task, a mean over its samples.
        per_sample_loss: whether ``loss_fn(..., reduction="none")`` gives per-sample values
            whose plain mean is the loss (then all tasks take one call); ``None`` detects it
            (:func:`plain_mean_loss`).
    """

    def __init__(self, loss_fn: LossFn, per_sample_loss: bool | None = None) -> None:
        self.loss_fn = loss_fn
        self.per_sample = (
            plain_mean_loss(loss_fn) if per_sample_loss is None else bool(per_sample_loss)
        )

    def per_task(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Each task's mean loss, ``[T]``: one call over all tasks when the loss allows."""
        num_tasks = outputs.shape[0]
        if not self.per_sample:
            return torch.stack(
                [self.one(o, y, t) for t, (o, y) in enumerate(zip(outputs, targets))]
            )
        self.check_targets(outputs[0], targets[0])
        try:
            per_sample = self.loss_fn(
                outputs.flatten(0, 1), targets.flatten(0, 1), reduction="none"
            )
        except IndexError as error:
            raise_label_error(outputs, targets, error)
        return per_sample.reshape(num_tasks, -1).mean(1)

    def one(self, outputs: Tensor, targets: Tensor, task: int) -> Tensor:
        """``loss_fn`` of one task's ``[N, ...]`` outputs and targets."""
        self.check_targets(outputs, targets)
        try:
            return self.loss_fn(outputs, targets)
        except IndexError as error:
            raise_label_error(outputs[None], targets[None], error, first_task=task)

    def check_targets(self, outputs: Tensor, targets: Tensor) -> None:
        """Refuse one task's float targets that torch's losses would broadcast to its outputs.

        (``[N]`` targets for ``[N, 1]`` outputs: an ``[N, N]`` loss mixing samples, and tasks
        on the task-batched path.) Only for the losses MAML knows (``per_sample_loss``).
        """
        if not (self.per_sample and targets.is_floating_point()):
            return
        if outputs.shape != targets.shape and base_loss(self.loss_fn) in _CLASS_INDEX_LOSSES:
            raise ValueError(
                f"the targets of a task are {targets.dtype} of shape {tuple(targets.shape)} for "
                f"outputs of shape {tuple(outputs.shape)}: class targets must be integer "
                "indices (targets.long(): torch.int64 labels 0..C-1), or class probabilities "
                "of the outputs' shape"
            )
        if outputs.shape != targets.shape:
            raise ValueError(
                f"the outputs of a task have shape {tuple(outputs.shape)} but its targets "
                f"{tuple(targets.shape)}: the loss would broadcast them against each other, "
                "mixing samples (and tasks). Give the targets the outputs' shape, e.g. "
                "targets.unsqueeze(-1) for [T, N] targets of a [T, N, 1] regression"
            )


def base_loss(loss_fn: LossFn) -> LossFn:
    """The function inside any ``functools.partial`` wrappers."""
    while isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    return loss_fn


_CLASS_INDEX_LOSSES = (F.cross_entropy, F.nll_loss)  # targets: class indices (or probabilities)


def plain_mean_loss(loss_fn: LossFn) -> bool:
    """Whether ``loss_fn`` is the plain mean of its ``reduction="none"`` values.

    True for torch's functional losses, bare or in a ``functools.partial`` that binds
    keywords such as ``label_smoothing``; other callables are called task by task.
    """
    bound: set[str] = set()
    while isinstance(loss_fn, functools.partial):
        if loss_fn.args:  # bound positionals would shift (outputs, targets)
            return False
        bound |= loss_fn.keywords.keys()
        loss_fn = loss_fn.func
    # reduction: the caller's own; weight and ignore_index make the mean a weighted one
    if bound & {"reduction", "weight", "ignore_index"}:
        return False
    return any(loss_fn is known for known in _PLAIN_MEAN_LOSSES)


_PLAIN_MEAN_LOSSES = (F.cross_entropy, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
                      F.nll_loss, F.binary_cross_entropy_with_logits)  # fmt: skip


def raise_label_error(
    outputs: Tensor, targets: Tensor, error: IndexError, first_task: int = 0
) -> None:
    """Re-raise the loss's IndexError on ``[T, N, C, ...]`` outputs as a ValueError naming
    the out-of-range label; as it is when no label is out of range."""
    num_classes = outputs.shape[2] if outputs.dim() > 2 else 1
    if targets.is_floating_point():
        raise error
    bad = (targets < 0) | (targets >= num_classes)
    bad &= targets != -100  # torch's default ignore_index
    if not bad.any():
        raise error
    task, *sample = (int(i) for i in bad.nonzero()[0])
    label = int(targets[(task, *sample)])
    raise ValueError(
        f"task {first_task + task} has target {label} (sample {sample[0]}), but the model "
        f"outputs {num_classes} classes: labels must be in 0..{num_classes - 1} "
        "(relabel each task's classes 0..ways-1, as torchmeta's and mamlext's samplers do)"
    ) from error
