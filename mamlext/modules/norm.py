"""Meta normalisation layers, with per-task statistics in a task-batched call.

In a task-batched call every task is normalised with its own statistics, exactly as if
the tasks ran one by one: no statistic crosses from one task to another.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamlext.modules.module import (
    MetaModule,
    Params,
    check_task_input,
    fold_tasks,
    per_task,
    task_count,
    unfold_tasks,
)


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int) -> Tensor:
    """``y * weight + bias`` with per-task ``[T, C...]`` parameters aligned at ``channel_dim``."""
    if weight is None and bias is None:
        return y
    ref = weight if weight is not None else bias
    shape = [ref.shape[0]] + [1] * (channel_dim - 1) + list(ref.shape[1:])
    shape += [1] * (y.dim() - len(shape))
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


BN_POLICIES = ("transductive", "per_step", "running")


@dataclasses.dataclass(frozen=True)
class Position:
    """Where in MAML a forward runs: inner step ``step`` on the support set, or the query."""

    step: int = 0
    query: bool = False


_POSITION: contextvars.ContextVar[Position | None] = contextvars.ContextVar(
    "mamlext_bn_position", default=None
)
_RECORDER: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "mamlext_bn_recorder", default=None
)


@contextlib.contextmanager
def forward_position(position: Position) -> Iterator[None]:
    """Tell BatchNorm layers (policy ``per_step``) which statistics the enclosed calls use."""
    token = _POSITION.set(position)
    try:
        yield
    finally:
        _POSITION.reset(token)


@contextlib.contextmanager
def recording_batch_stats() -> Iterator[dict]:
    """Collect the per-task batch statistics of the enclosed training-mode calls.

    Yields a dict ``{(layer, row): [(mean [n, C], var [n, C]), ...]}`` for
    :meth:`_MetaBatchNorm.commit_running_stats`.
    """
    records: dict = {}
    token = _RECORDER.set(records)
    try:
        yield records
    finally:
        _RECORDER.reset(token)


class _MetaBatchNorm(MetaModule):
    """Shared forward of ``MetaBatchNorm1d/2d/3d``, with an explicit MAML policy.

    In a task-batched call (input ``[T, N, C, *S]``) every task is normalised with its
    own statistics. ``policy`` (set by :class:`mamlext.MAML`) decides the statistics:

    ``None``
        ``nn.BatchNorm``'s semantics (torchmeta's layer): batch statistics in training
        mode, updating the running ones; running statistics in eval mode.
    ``"transductive"`` (original MAML)
        batch statistics always, in training and eval mode, inner and outer loop, meta-test
        included; running statistics never touched.
    ``"per_step"`` (MAML++)
        one set of running statistics per inner step and one for the query set. Training
        mode normalises with each task's batch statistics; after each meta-training step
        MAML moves each set towards the mean over tasks of those statistics. Eval mode
        normalises with the set of the current step (meta-test).
    ``"running"``
        as ``per_step`` with a single set: ordinary non-transductive evaluation.
    """

    policy: str | None = None

    def set_policy(self, policy: str | None, num_steps: int = 1) -> None:
        """Choose the statistics policy; ``per_step`` keeps ``num_steps + 1`` sets."""
        if policy is not None and policy not in BN_POLICIES:
            raise ValueError(
                f"BatchNorm policy must be one of {BN_POLICIES} or None, got {policy!r}"
            )
        if policy in ("per_step", "running") and not self.track_running_stats:
            raise ValueError(f"policy {policy!r} needs track_running_stats=True")
        self.policy = policy
        if policy in ("per_step", "running"):
            rows = num_steps + 1 if policy == "per_step" else 1
            mean = self.running_mean.detach().clone().expand(rows, -1).clone()
            var = self.running_var.detach().clone().expand(rows, -1).clone()
            self.register_buffer("step_running_mean", mean)
            self.register_buffer("step_running_var", var)

    def _row(self) -> int:
        if self.policy != "per_step":
            return 0
        position = _POSITION.get() or Position(query=True)
        rows = self.step_running_mean.shape[0]
        # Steps beyond the trained ones (more steps at meta-test) reuse the last support set.
        return rows - 1 if position.query else min(position.step, rows - 2)

    def forward(self, input: Tensor, params: Params | None = None) -> Tensor:
        weight, bias = self.meta_param(params, "weight"), self.meta_param(params, "bias")
        num_tasks = task_count()
        if self.policy is None:
            use_batch_stats = self.training or not self.track_running_stats
            mean, var = None, None
            if not use_batch_stats:
                mean, var = self.running_mean, self.running_var
        elif self.policy == "transductive" or self.training:
            use_batch_stats, mean, var = True, None, None
        else:
            use_batch_stats = False
            mean, var = self.step_running_mean[self._row()], self.step_running_var[self._row()]

        if num_tasks is None:
            if self.policy is None:
                return self._torch_batch_norm(input, weight, bias)
            self._record(input.detach().unsqueeze(0))
            return F.batch_norm(input, mean, var, weight, bias, use_batch_stats, 0.0, self.eps)

        check_task_input(input, num_tasks, self, min_dim=3)
        weight = per_task(weight, self.weight, num_tasks)
        bias = per_task(bias, self.bias, num_tasks)
        # [T, N, C, *S] -> [N, T*C, *S]: one batch_norm over task x channel groups.
        x = input.transpose(0, 1).flatten(1, 2)
        flat_w = None if weight is None else weight.flatten()
        flat_b = None if bias is None else bias.flatten()
        if use_batch_stats:
            out = F.batch_norm(x, None, None, flat_w, flat_b, True, 0.0, self.eps)
            if self.policy is None and self.training and self.track_running_stats:
                self._torch_update(*_task_stats(input.detach()))
            elif self.policy is not None:
                self._record(input.detach())
        else:
            mean, var = mean.repeat(num_tasks), var.repeat(num_tasks)
            out = F.batch_norm(x, mean, var, flat_w, flat_b, False, 0.0, self.eps)
        return out.unflatten(1, (num_tasks, -1)).transpose(0, 1)

    def _torch_batch_norm(self, input, weight, bias):
        """``nn.BatchNorm``'s forward with the given affine parameters."""
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or not self.track_running_stats
        running = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if running else None,
            self.running_var if running else None,
            weight, bias, use_batch_stats, momentum, self.eps,
        )  # fmt: skip

    @torch.no_grad()
    def _torch_update(self, mean: Tensor, var: Tensor) -> None:
        """One momentum step towards the mean over tasks of the per-task statistics."""
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.mean(0), momentum)
        self.running_var.lerp_(var.mean(0), momentum)

    def _record(self, input: Tensor) -> None:
        records = _RECORDER.get()
        if records is not None and self.training and self.policy in ("per_step", "running"):
            records.setdefault((self, self._row()), []).append(_task_stats(input))

    @torch.no_grad()
    def commit_running_stats(self, records: dict) -> None:
        """Move each recorded set one momentum step towards its mean over tasks.

        ``momentum=None``: a cumulative average over meta-batches, as ``nn.BatchNorm``'s.
        """
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        for (layer, row), stats in records.items():
            if layer is not self:
                continue
            mean = torch.cat([m for m, _ in stats]).mean(0)
            var = torch.cat([v for _, v in stats]).mean(0)
            self.step_running_mean[row].lerp_(mean, momentum)
            self.step_running_var[row].lerp_(var, momentum)


def _task_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task batch mean and unbiased variance, ``[T, C]`` each, of ``[T, N, C, *S]``."""
    dims = [1, *range(3, input.dim())]
    count = input.numel() // (input.shape[0] * input.shape[2])
    mean = input.mean(dims)
    var = input.var(dims, unbiased=False) * (count / max(count - 1, 1))
    return mean, var


class MetaBatchNorm1d(nn.BatchNorm1d, _MetaBatchNorm):
    __doc__ = nn.BatchNorm1d.__doc__
    forward = _MetaBatchNorm.forward


class MetaBatchNorm2d(nn.BatchNorm2d, _MetaBatchNorm):
    __doc__ = nn.BatchNorm2d.__doc__
    forward = _MetaBatchNorm.forward


class MetaBatchNorm3d(nn.BatchNorm3d, _MetaBatchNorm):
    __doc__ = nn.BatchNorm3d.__doc__
    forward = _MetaBatchNorm.forward


class MetaLayerNorm(nn.LayerNorm, MetaModule):
    __doc__ = nn.LayerNorm.__doc__

    def forward(self, input: Tensor, params: Params | None = None) -> Tensor:
        weight, bias = self.meta_param(params, "weight"), self.meta_param(params, "bias")
        num_tasks = task_count()
        if num_tasks is None:
            return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)
        check_task_input(input, num_tasks, self, min_dim=1 + len(self.normalized_shape))
        y = F.layer_norm(input, self.normalized_shape, None, None, self.eps)
        channel_dim = input.dim() - len(self.normalized_shape)
        return _affine(
            y,
            per_task(weight, self.weight, num_tasks),
            per_task(bias, self.bias, num_tasks),
            channel_dim,
        )


class MetaGroupNorm(nn.GroupNorm, MetaModule):
    __doc__ = nn.GroupNorm.__doc__

    def forward(self, input: Tensor, params: Params | None = None) -> Tensor:
        weight, bias = self.meta_param(params, "weight"), self.meta_param(params, "bias")
        num_tasks = task_count()
        if num_tasks is None:
            return F.group_norm(input, self.num_groups, weight, bias, self.eps)
        check_task_input(input, num_tasks, self, min_dim=3)
        folded, n_major = fold_tasks(input)
        y = unfold_tasks(
            F.group_norm(folded, self.num_groups, None, None, self.eps), num_tasks, n_major
        )
        return _affine(
            y,
            per_task(weight, self.weight, num_tasks),
            per_task(bias, self.bias, num_tasks),
            channel_dim=2,
        )
