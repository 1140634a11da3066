"""Meta normalisation layers, with per-task statistics in a task-batched call.

In a task-batched call every task is normalised with its own statistics, exactly as if
the tasks ran one by one: no statistic crosses from one task to another.

Longer than 350 lines: the BatchNorm layers' shared settings and per-call position
(``NormSettings``, ``NormStep``: which policy, step and row) sit beside the layers, their
only readers, so that what a BatchNorm forward reads is in one file.
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


BN_POLICIES = ("transductive", "support", "per_step", "running")
STATELESS_POLICIES = ("transductive", "support")  # batch statistics only, no running ones
RUNNING_POLICIES = ("per_step", "running")  # train running statistics, read them in eval
QUERY_ROWS = ("own", "last_step")


@dataclasses.dataclass
class NormSettings:
    """How the Meta BatchNorm layers that share this object choose their statistics.

    Written by :class:`mamlext.BatchNormPolicy` (its one owner), read by the layers, which
    hold it as ``norm_settings`` (``None``: ``nn.BatchNorm``'s semantics, torchmeta's layer).

    Attributes:
        policy: ``None``, ``"transductive"``, ``"support"``, ``"per_step"`` or ``"running"``
            (``BatchNormPolicy`` says what each means).
        num_steps: inner steps of meta-training; rows ``0..num_steps - 1`` belong to them.
        per_step_weights: the affine weight and bias are the rows of ``step_weight`` and
            ``step_bias`` (MAML++'s BNWB).
        query_row: which per-step row a query pass uses: ``"own"``, row ``num_steps``, one
            of its own; ``"last_step"``, the row of the inner step just taken (MAML++'s
            authors' code).
    """

    policy: str | None = None
    num_steps: int = 1
    per_step_weights: bool = False
    query_row: str = "own"

    @property
    def num_rows(self) -> int:
        """Rows of per-step values: one per trained step, and the query's own if any."""
        return self.num_steps + 1 if self.query_row == "own" else max(self.num_steps, 1)

    def row(self, step: int | None, steps_taken: int | None = None) -> int:
        """The row of per-step values at inner step ``step``, or (``None``) in the query pass
        after ``steps_taken`` steps (``None``: as many as trained); steps beyond the trained
        ones use the last support row."""
        last = max(self.num_steps - 1, 0)
        if step is None:
            if self.query_row == "own":
                return self.num_steps
            step = last if steps_taken is None else steps_taken - 1
        return min(max(step, 0), last)

    def statistics_row(self, step: int | None, steps_taken: int | None = None) -> int:
        """The row of running statistics: per step with ``per_step``, else the only one."""
        return self.row(step, steps_taken) if self.policy == "per_step" else 0


@dataclasses.dataclass(frozen=True)
class NormStep:
    """Where in MAML the forwards in progress are, for the layers of one ``NormSettings``.

    Attributes:
        owner: the settings of the layers this applies to (other layers see the default).
        step: the inner step on the support sets; ``None``: the query pass (and outside MAML).
        records: where training forwards append ``(layer, row, (mean, var))`` with each
            task's batch statistics ``[T, C]``; ``None``: record nothing.
        replaying: a recomputation of forwards already done (the inner loop's recompute in
            backward): record nothing, update no running statistics.
        support_samples: policy ``"support"``'s query pass: the inputs are each task's
            support samples followed by its queries, and the first ``support_samples``
            give the statistics that normalise all of them.
        steps_taken: in a query pass, the inner steps taken before it (``query_row=
            "last_step"`` reads the row of the last of them).
    """

    owner: NormSettings | None = None
    step: int | None = None
    records: list | None = None
    replaying: bool = False
    support_samples: int | None = None
    steps_taken: int | None = None


OUTSIDE_MAML = NormStep()  # the query position, recording nothing: a plain forward
_NORM_STEP: contextvars.ContextVar[NormStep | None] = contextvars.ContextVar(
    "mamlext_norm_step", default=None
)


def norm_step(settings: NormSettings | None) -> NormStep:
    """The position that applies to layers of ``settings`` now."""
    position = _NORM_STEP.get()
    if position is None or settings is None or position.owner is not settings:
        return OUTSIDE_MAML
    return position


@contextlib.contextmanager
def at_norm_step(position: NormStep) -> Iterator[None]:
    """Run the enclosed forwards at ``position`` (for the layers of ``position.owner``)."""
    token = _NORM_STEP.set(position)
    try:
        yield
    finally:
        _NORM_STEP.reset(token)


class MetaBatchNormBase(MetaModule):
    """Shared forward of ``MetaBatchNorm1d/2d/3d``.

    In a task-batched call (input ``[T, N, C, *S]``) every task is normalised with its
    own statistics. Which statistics (batch or running ones, and which set) follows the
    layer's ``norm_settings`` and the current :class:`NormStep` (both set by
    :class:`mamlext.BatchNormPolicy`); without settings, or with policy ``None``, the
    layer has ``nn.BatchNorm``'s semantics (torchmeta's layer).
    """

    norm_settings: NormSettings | None = None

    def forward(self, input: Tensor, params: Params | None = None) -> Tensor:
        settings = self.norm_settings
        position = norm_step(settings)
        if settings is not None and settings.per_step_weights:
            row = settings.row(position.step, position.steps_taken)  # BNWB: this step's
            weight = self.meta_param(params, "step_weight").select(-2, row)
            bias = self.meta_param(params, "step_bias").select(-2, row)
        else:
            weight, bias = self.meta_param(params, "weight"), self.meta_param(params, "bias")
        if settings is None or settings.policy is None:
            return self._torch_forward(input, weight, bias, update=not position.replaying)
        if position.support_samples is not None:
            return self._normalise_by_support(input, weight, bias, position.support_samples)
        if settings.policy == "support" and position.step is None:
            raise ValueError(
                "bn='support' normalises each query with its task's support statistics, and "
                "this forward is given no support set: get query outputs with maml(xs, ys, xq, "
                "yq) or maml.predict(params, xq, xs), not model(xq, params=...)"
            )
        row = settings.statistics_row(position.step, position.steps_taken)
        use_running = settings.policy in RUNNING_POLICIES and not self.training
        running = (self.step_running_mean[row], self.step_running_var[row]) if use_running else None
        out = self._normalise(input, weight, bias, running)
        if running is None and position.records is not None and self.training:
            batched = input if task_count() is not None else input.unsqueeze(0)
            position.records.append((self, row, task_stats(batched.detach())))
        return out

    def _normalise(
        self,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """Normalise with ``running = (mean, var)`` ``[C]``, or each task's batch statistics."""
        mean, var = (None, None) if running is None else running
        num_tasks = task_count()
        if num_tasks is None:
            return F.batch_norm(input, mean, var, weight, bias, running is None, 0.0, self.eps)
        check_task_input(input, num_tasks, self, min_dim=3)
        # [C] (shared by the tasks) or [T, C]; the layer's own weight may be None (BNWB)
        weight = None if weight is None else weight.expand(num_tasks, weight.shape[-1])
        bias = None if bias is None else bias.expand(num_tasks, bias.shape[-1])
        # [T, N, C, *S] -> [N, T*C, *S]: one batch_norm over task x channel groups.
        x = input.transpose(0, 1).flatten(1, 2)
        flat_w = None if weight is None else weight.flatten()
        flat_b = None if bias is None else bias.flatten()
        if running is not None:
            mean, var = mean.repeat(num_tasks), var.repeat(num_tasks)
        out = F.batch_norm(x, mean, var, flat_w, flat_b, running is None, 0.0, self.eps)
        return out.unflatten(1, (num_tasks, -1)).transpose(0, 1)

    def _normalise_by_support(
        self, input: Tensor, weight: Tensor | None, bias: Tensor | None, support: int
    ) -> Tensor:
        """Normalise every sample with the batch statistics of each task's first ``support``
        samples (``[N, C, *S]``, or ``[T, N, C, *S]`` task-batched), differentiably."""
        num_tasks = task_count()
        sample_dim = 0 if num_tasks is None else 1
        if num_tasks is not None:
            check_task_input(input, num_tasks, self, min_dim=3)
        dims = [sample_dim, *range(sample_dim + 2, input.dim())]
        statistics_of = input.narrow(sample_dim, 0, support)
        mean = statistics_of.mean(dims, keepdim=True)
        var = statistics_of.var(dims, unbiased=False, keepdim=True)
        y = (input - mean) * torch.rsqrt(var + self.eps)
        if num_tasks is None:
            shape = [1, -1] + [1] * (input.dim() - 2)
            y = y if weight is None else y * weight.reshape(shape)
            return y if bias is None else y + bias.reshape(shape)
        weight = None if weight is None else weight.expand(num_tasks, weight.shape[-1])
        bias = None if bias is None else bias.expand(num_tasks, bias.shape[-1])
        return _affine(y, weight, bias, channel_dim=2)

    def _torch_forward(
        self, input: Tensor, weight: Tensor | None, bias: Tensor | None, update: bool = True
    ) -> Tensor:
        """``nn.BatchNorm``'s semantics; task-batched, the update uses the mean over tasks.

        ``update=False``: the running statistics are read as usual but not updated.
        """
        if task_count() is None:
            return self._torch_batch_norm(input, weight, bias, update)
        use_running = not self.training and self.track_running_stats
        running = (self.running_mean, self.running_var) if use_running else None
        out = self._normalise(input, weight, bias, running)
        if self.training and self.track_running_stats and update:
            self._torch_update(*task_stats(input.detach()))
        return out

    def _torch_batch_norm(self, input, weight, bias, update: bool = True):
        """``nn.BatchNorm``'s forward with the given affine parameters."""
        if self.training and not update:  # batch statistics, the running ones untouched
            return F.batch_norm(input, None, None, weight, bias, True, 0.0, self.eps)
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


def task_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task batch mean and unbiased variance, ``[T, C]`` each, of ``[T, N, C, *S]``."""
    dims = [1, *range(3, input.dim())]
    count = input.numel() // (input.shape[0] * input.shape[2])
    mean = input.mean(dims)
    var = input.var(dims, unbiased=False) * (count / max(count - 1, 1))
    return mean, var


class MetaBatchNorm1d(nn.BatchNorm1d, MetaBatchNormBase):
    __doc__ = nn.BatchNorm1d.__doc__
    forward = MetaBatchNormBase.forward


class MetaBatchNorm2d(nn.BatchNorm2d, MetaBatchNormBase):
    __doc__ = nn.BatchNorm2d.__doc__
    forward = MetaBatchNormBase.forward


class MetaBatchNorm3d(nn.BatchNorm3d, MetaBatchNormBase):
    __doc__ = nn.BatchNorm3d.__doc__
    forward = MetaBatchNormBase.forward


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


TORCH_TO_META_BATCHNORM = {
    nn.BatchNorm1d: MetaBatchNorm1d,
    nn.BatchNorm2d: MetaBatchNorm2d,
    nn.BatchNorm3d: MetaBatchNorm3d,
}


def make_meta_batchnorm(model: nn.Module) -> list[str]:
    """Turn the torch BatchNorm layers of ``model`` into mamlext's, in place; their names.

    Each ``nn.BatchNorm1d/2d/3d`` (exactly those classes: a subclass may have its own
    forward) becomes a ``MetaBatchNorm1d/2d/3d``, a subclass of it with the same parameters,
    buffers, names and, without a policy, the same forward: what lets a
    :class:`mamlext.BatchNormPolicy` reach the BatchNorm layers of a model with its own
    ``forward``. ``isinstance(layer, nn.BatchNorm2d)`` stays true.
    """
    changed = []
    for name, module in model.named_modules():
        meta = TORCH_TO_META_BATCHNORM.get(type(module))
        if meta is not None:
            module.__class__ = meta
            changed.append(name)
    return changed
