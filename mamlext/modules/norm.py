"""Meta normalisation layers, with per-task statistics in a task-batched call.

In a task-batched call every task is normalised with its own statistics, exactly as if
the tasks ran one by one: no statistic crosses from one task to another.
"""

from __future__ import annotations

import contextlib
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


class MetaBatchNormBase(MetaModule):
    """Shared forward of ``MetaBatchNorm1d/2d/3d``.

    In a task-batched call (input ``[T, N, C, *S]``) every task is normalised with its
    own statistics. Which statistics (batch or running ones, and which set) is decided by
    the :class:`BatchNormPolicy` the layer follows, ``bn_policy`` (attached by
    :class:`mamlext.MAML`); without one, or with policy ``None``, the layer has
    ``nn.BatchNorm``'s semantics (torchmeta's layer).
    """

    bn_policy: BatchNormPolicy | None = None

    def forward(self, input: Tensor, params: Params | None = None) -> Tensor:
        policy = self.bn_policy
        if policy is not None and policy.per_step_weights:
            row = policy.step_row()  # BNWB: this step's own weight and bias
            weight = self.meta_param(params, "step_weight").select(-2, row)
            bias = self.meta_param(params, "step_bias").select(-2, row)
        else:
            weight, bias = self.meta_param(params, "weight"), self.meta_param(params, "bias")
        if policy is None or policy.name is None:
            update = policy is None or not policy.replaying_now
            return self._torch_forward(input, weight, bias, update)
        running = policy.running_statistics(self)
        out = self._normalise(input, weight, bias, running)
        if running is None:
            policy.record(self, input if task_count() is not None else input.unsqueeze(0))
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
            self._torch_update(*_task_stats(input.detach()))
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


class BatchNormPolicy:
    """Which statistics the Meta BatchNorm layers of a model use in MAML: their one owner.

    Policies (``name``):

    ``None``
        ``nn.BatchNorm``'s semantics (torchmeta's layer): batch statistics in training
        mode, updating the running ones; running statistics in eval mode.
    ``"transductive"`` (original MAML)
        batch statistics always, in training and eval mode, inner and outer loop, meta-test
        included; running statistics never touched.
    ``"per_step"`` (MAML++)
        one set of running statistics per inner step and one for the query set. Training
        mode normalises with each task's batch statistics; after each meta-training step
        (:meth:`meta_batch`) each set moves one ``momentum`` step towards the mean over
        tasks of those statistics. Eval mode normalises with the set of the current step.
    ``"running"``
        as ``per_step`` with a single set: ordinary non-transductive evaluation.

    Per-step weights (``per_step_weights``, MAML++'s BNWB), with any policy: each affine
    layer's ``weight`` and ``bias`` ``[C]`` are replaced by the parameters ``step_weight``
    and ``step_bias`` ``[num_steps + 1, C]`` (initialised from them): row ``k`` scales and
    shifts at inner step ``k``, the last row at the query pass. They are learned in the outer
    loop only (MAML never adapts them: an inner update of row ``k`` would only matter at step
    ``k``, already taken).

    Steps beyond the trained ones (more inner steps at meta-test than ``num_steps``) use the
    last support row, of statistics and of weights alike; the query pass always its own row.

    The sets live in each layer's buffers ``step_running_mean`` and ``step_running_var``,
    ``[rows, C]`` (:attr:`rows`, :meth:`statistics`); the layers keep them, the policy
    decides when they are read and updated. :class:`mamlext.MAML` holds one as
    ``maml.bn_policy``.

    Args:
        model: the model whose BatchNorm layers follow the policy. A plain
            ``nn.BatchNorm`` (whose statistics this cannot manage) is allowed only with
            ``name=None``.
        name: the policy, one of ``BN_POLICIES`` or ``None``.
        num_steps: inner steps of meta-training (``per_step`` keeps ``num_steps + 1`` sets).
        per_step_weights: BNWB (above); fixed at construction, as it changes the parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str | None = "transductive",
        num_steps: int = 1,
        per_step_weights: bool = False,
    ) -> None:
        self.model = model
        self.num_steps = num_steps
        self._name: str | None = None
        self._step: int | None = None  # inner step of the forwards in progress; None: query
        self._records: dict | None = None  # {layer: {row: [(mean [n, C], var [n, C])]}}
        self._replaying = False
        self.per_step_weights = bool(per_step_weights)
        affine = [m for m in model.modules() if isinstance(m, MetaBatchNormBase) and m.affine]
        if self.per_step_weights and not affine:
            raise ValueError(
                "per-step BatchNorm weights (bn_per_step_weights) need a mamlext Meta BatchNorm "
                "layer with affine=True in the model; it has none"
            )
        self.set(name)
        if self.per_step_weights:
            self._make_per_step_weights(affine)

    def _make_per_step_weights(self, affine: list[MetaBatchNormBase]) -> None:
        for layer in affine:
            for kind in ("weight", "bias"):
                own = getattr(layer, kind)
                rows = own.detach().expand(self.num_steps + 1, -1).clone()
                setattr(layer, kind, None)  # the per-step rows stand for it
                layer.register_parameter(f"step_{kind}", nn.Parameter(rows))

    def per_step_weight_names(self) -> list[str]:
        """Names in the model of the BNWB parameters (none without ``per_step_weights``)."""
        if not self.per_step_weights:
            return []
        rows = {
            id(getattr(m, f"step_{kind}", None))
            for m in self.layers()
            for kind in ("weight", "bias")
        }
        return [name for name, param in self.model.named_parameters() if id(param) in rows]

    @property
    def name(self) -> str | None:
        """The policy: one of ``BN_POLICIES``, or ``None``; change it with :meth:`set`."""
        return self._name

    @property
    def rows(self) -> int:
        """Sets of running statistics per layer: ``num_steps + 1``, 1 (``running``) or 0."""
        return {"per_step": self.num_steps + 1, "running": 1}.get(self._name, 0)

    def set(self, name: str | None) -> None:
        """Make every Meta BatchNorm layer of the model follow policy ``name``.

        ``per_step`` and ``running`` start their sets from the layers' ``running_mean`` and
        ``running_var``; other policies leave the layers' buffers as they are.
        """
        if name is not None and name not in BN_POLICIES:
            raise ValueError(f"bn must be one of {BN_POLICIES} or None, got {name!r}")
        trains = name in ("per_step", "running")
        layers = []
        for module_name, module in self.model.named_modules():
            if isinstance(module, MetaBatchNormBase):
                if trains and not module.track_running_stats:
                    raise ValueError(
                        f"BatchNorm {module_name!r}: policy {name!r} needs track_running_stats=True"
                    )
                layers.append(module)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and name is not None:
                raise ValueError(
                    f"{module_name!r} is a {type(module).__name__}, whose statistics mamlext "
                    "cannot manage: use mamlext's MetaBatchNorm (mamlext.modules.metafy converts "
                    "a model), or pass bn=None to keep its own nn.BatchNorm behaviour"
                )
        self._name = name
        for layer in layers:
            layer.bn_policy = self
            if trains:
                for stat in ("mean", "var"):
                    own = getattr(layer, f"running_{stat}").detach()
                    layer.register_buffer(
                        f"step_running_{stat}", own.clone().expand(self.rows, -1).clone()
                    )

    def layers(self) -> list[MetaBatchNormBase]:
        """The model's Meta BatchNorm layers that follow this policy."""
        return [
            m
            for m in self.model.modules()
            if isinstance(m, MetaBatchNormBase) and m.bn_policy is self
        ]

    def statistics(self) -> list[Tensor]:
        """The running statistics this policy trains, ``[rows, C]`` each.

        ``step_running_mean`` and ``step_running_var`` of every layer (``per_step``,
        ``running``; none otherwise): what distributed training averages over processes.
        """
        if not self.rows:
            return []
        return [t for m in self.layers() for t in (m.step_running_mean, m.step_running_var)]

    def trains_statistics(self, training: bool) -> bool:
        """Whether a meta-batch in this mode (MAML's ``training``) updates running statistics."""
        return training and self._name in ("per_step", "running")

    def check_modes(self, training: bool) -> None:
        """Raise if a BatchNorm would normalise with never-trained statistics at meta-training."""
        if not training or self._name == "transductive":
            return
        for name, module in self.model.named_modules():
            untrained_eval_bn = (
                isinstance(module, nn.modules.batchnorm._BatchNorm)
                and not module.training
                and module.track_running_stats
                and int(module.num_batches_tracked) == 0
            )
            if untrained_eval_bn:
                raise ValueError(
                    f"BatchNorm {name!r} is in eval mode during meta-training, with running "
                    "statistics that were never trained: it would normalise with mean 0 and "
                    "variance 1. Call maml.train() for meta-training (BatchNorm then uses batch "
                    "statistics), or use bn='transductive'"
                )

    def at_step(self, step: int) -> contextlib.AbstractContextManager[None]:
        """The enclosed forwards are inner step ``step`` on the support sets."""
        return self._at(step)

    def at_query(self, record: bool = True) -> contextlib.AbstractContextManager[None]:
        """The enclosed forwards are on the query sets (also the default outside MAML).

        ``record=False``: an extra query pass (the multi-step loss's, before the last step)
        whose statistics are not recorded: the query set's running statistics follow the
        final pass alone, the one meta-test normalises.
        """
        return self._at(None, record)

    @contextlib.contextmanager
    def _at(self, step: int | None, record: bool = True) -> Iterator[None]:
        outer = self._step, self._records
        self._step = step
        if not record:
            self._records = None
        try:
            yield
        finally:
            self._step, self._records = outer

    @contextlib.contextmanager
    def meta_batch(self, training: bool) -> Iterator[None]:
        """Record each task's batch statistics in the enclosed forwards; commit them once after.

        Only when :meth:`trains_statistics`; a meta-batch that raises commits nothing.
        """
        if not self.trains_statistics(training):
            yield
            return
        outer, self._records = self._records, {}
        try:
            yield
            records = self._records
        finally:
            self._records = outer
        self._commit(records)

    @property
    def replaying_now(self) -> bool:
        """Whether the forwards in progress are a recomputation (see :meth:`replaying`)."""
        return self._replaying

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """The enclosed forwards repeat ones already done (the inner-loop recomputation of
        :mod:`mamlext.inner_checkpoint`): they record no statistics and update no running
        statistics (``nn.BatchNorm``'s own updates with ``name=None`` included).
        """
        outer = self._records, self._replaying
        self._records, self._replaying = None, True
        try:
            yield
        finally:
            self._records, self._replaying = outer

    def running_statistics(self, layer: MetaBatchNormBase) -> tuple[Tensor, Tensor] | None:
        """``(mean, var)`` ``[C]`` that ``layer`` normalises with now; ``None``: batch statistics."""
        if self._name == "transductive" or layer.training:
            return None
        row = self._row()
        return layer.step_running_mean[row], layer.step_running_var[row]

    def record(self, layer: MetaBatchNormBase, input: Tensor) -> None:
        """Keep the per-task statistics of ``layer``'s input ``[T, N, C, *S]`` for the commit."""
        if self._records is not None and layer.training:
            rows = self._records.setdefault(layer, {})
            rows.setdefault(self._row(), []).append(_task_stats(input.detach()))

    def step_row(self) -> int:
        """The row of per-step values of the forwards in progress: inner step ``k``'s, or
        ``num_steps`` on the query sets; steps beyond the trained ones use the last support row."""
        if self._step is None:
            return self.num_steps
        return min(self._step, max(self.num_steps - 1, 0))

    def _row(self) -> int:
        return self.step_row() if self._name == "per_step" else 0

    @torch.no_grad()
    def _commit(self, records: dict) -> None:
        """Move each recorded set one momentum step towards its mean over tasks.

        ``momentum=None``: a cumulative average over meta-batches, as ``nn.BatchNorm``'s.
        """
        for layer, rows in records.items():
            layer.num_batches_tracked.add_(1)
            tracked = float(layer.num_batches_tracked)
            momentum = 1.0 / tracked if layer.momentum is None else layer.momentum
            for row, stats in rows.items():
                mean = torch.cat([m for m, _ in stats]).mean(0)
                var = torch.cat([v for _, v in stats]).mean(0)
                layer.step_running_mean[row].lerp_(mean, momentum)
                layer.step_running_var[row].lerp_(var, momentum)


def _task_stats(input: Tensor) -> tuple[Tensor, Tensor]:
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
