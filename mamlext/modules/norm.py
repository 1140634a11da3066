"""Meta normalisation layers, with per-task statistics in a task-batched call.

In a task-batched call every task is normalised with its own statistics, exactly as if
the tasks ran one by one: no statistic crosses from one task to another.
"""

from __future__ import annotations

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


class _MetaBatchNorm(MetaModule):
    """Shared forward of ``MetaBatchNorm1d/2d/3d``.

    Unbatched, it is ``nn.BatchNorm``. Task-batched (input ``[T, N, C, *S]``), each task
    is normalised with its own batch statistics in training mode (or when running
    statistics are not tracked) and with the running statistics in eval mode. In
    training mode the running statistics move towards the mean over tasks of the
    per-task batch statistics (one momentum step per call).
    """

    def forward(self, input: Tensor, params: Params | None = None) -> Tensor:
        weight, bias = self.meta_param(params, "weight"), self.meta_param(params, "bias")
        num_tasks = task_count()
        use_batch_stats = self.training or not self.track_running_stats
        if num_tasks is None:
            return self._unbatched(input, weight, bias, use_batch_stats)
        check_task_input(input, num_tasks, self, min_dim=3)
        weight = per_task(weight, self.weight, num_tasks)
        bias = per_task(bias, self.bias, num_tasks)
        # [T, N, C, *S] -> [N, T*C, *S]: one batch_norm over task x channel groups.
        x = input.transpose(0, 1).flatten(1, 2)
        flat_w = None if weight is None else weight.flatten()
        flat_b = None if bias is None else bias.flatten()
        if use_batch_stats:
            out = F.batch_norm(x, None, None, flat_w, flat_b, True, 0.0, self.eps)
            if self.training and self.track_running_stats:
                self._update_running_stats(x.detach(), num_tasks)
        else:
            mean = self.running_mean.repeat(num_tasks)
            var = self.running_var.repeat(num_tasks)
            out = F.batch_norm(x, mean, var, flat_w, flat_b, False, 0.0, self.eps)
        return out.unflatten(1, (num_tasks, -1)).transpose(0, 1)

    def _unbatched(self, input, weight, bias, use_batch_stats):
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        running = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if running else None,
            self.running_var if running else None,
            weight, bias, use_batch_stats, momentum, self.eps,
        )  # fmt: skip

    @torch.no_grad()
    def _update_running_stats(self, x: Tensor, num_tasks: int) -> None:
        dims = [0, *range(2, x.dim())]
        count = x.numel() // x.shape[1]
        mean = x.mean(dims).view(num_tasks, -1)
        var = x.var(dims, unbiased=False).view(num_tasks, -1) * (count / max(count - 1, 1))
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.mean(0), momentum)
        self.running_var.lerp_(var.mean(0), momentum)


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
