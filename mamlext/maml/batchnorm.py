"""``BatchNormPolicy``: which statistics a model's Meta BatchNorm layers use in MAML.

The policy writes the layers' shared :class:`~mamlext.modules.norm.NormSettings` and, for
the duration of each inner step or query pass, a :class:`~mamlext.modules.norm.NormStep`
that the layers read; it commits the statistics they record. The layers never call it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from mamlext.modules.norm import (
    BN_POLICIES,
    QUERY_ROWS,
    RUNNING_POLICIES,
    STATELESS_POLICIES,
    MetaBatchNormBase,
    NormSettings,
    at_norm_step,
    norm_step,
)


class BatchNormPolicy:
    """Which statistics the Meta BatchNorm layers of a model use in MAML: their one owner.

    Policies (``name``):

    ``None``
        ``nn.BatchNorm``'s semantics (torchmeta's layer): batch statistics in training
        mode, updating the running ones; running statistics in eval mode.
    ``"transductive"`` (original MAML)
        batch statistics always, in training and eval mode, inner and outer loop, meta-test
        included; running statistics never touched. A query prediction depends on the other
        queries of its task (they share the statistics).
    ``"support"``
        transductive on the support set only: in training and eval mode, each task's query
        pass is normalised with the batch statistics of that task's support set under the
        same parameters (the support samples run through the model with the queries, and
        their statistics normalise both, differentiably); the inner loop as ``transductive``.
        A query prediction depends on its task's support set alone, never on the other
        queries, so one query at a time gives the same answer. Running statistics never
        touched.
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
    last support row, of statistics and of weights alike; the query pass its own row.

    ``query_row="last_step"`` (MAML++'s authors' code) gives the query pass no row of its own:
    the query after inner step ``k`` uses row ``k`` (the final one row ``num_steps - 1``), so
    there are ``num_steps`` rows of weights and statistics instead of ``num_steps + 1``.
    With ``per_step``, the last row's statistics then move towards the mean over the last
    support pass and the query pass, the two it normalises at meta-test.

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
        query_row: ``"own"`` or ``"last_step"`` (above); fixed at construction.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str | None = "transductive",
        num_steps: int = 1,
        per_step_weights: bool = False,
        query_row: str = "own",
    ) -> None:
        if query_row not in QUERY_ROWS:
            raise ValueError(f"bn_query_row must be one of {QUERY_ROWS}, got {query_row!r}")
        self.model = model
        self.settings = NormSettings(None, num_steps, bool(per_step_weights), query_row)
        affine = [m for m in model.modules() if isinstance(m, MetaBatchNormBase) and m.affine]
        if per_step_weights and not affine:
            raise ValueError(
                "per-step BatchNorm weights (bn_per_step_weights) need a mamlext Meta BatchNorm "
                "layer with affine=True in the model; it has none"
            )
        self.set(name)
        if per_step_weights:
            self._make_per_step_weights(affine)

    @property
    def num_steps(self) -> int:
        """Inner steps of meta-training (``per_step`` keeps ``num_steps + 1`` sets)."""
        return self.settings.num_steps

    @property
    def per_step_weights(self) -> bool:
        """MAML++'s BNWB: per-step BatchNorm weights and biases (fixed at construction)."""
        return self.settings.per_step_weights

    def _make_per_step_weights(self, affine: list[MetaBatchNormBase]) -> None:
        for layer in affine:
            for kind in ("weight", "bias"):
                own = getattr(layer, kind)
                rows = own.detach().expand(self.settings.num_rows, -1).clone()
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
        return self.settings.policy

    @property
    def rows(self) -> int:
        """Sets of running statistics per layer: ``num_steps + 1`` (``num_steps`` with
        ``query_row="last_step"``) for ``per_step``, 1 for ``running``, else 0."""
        return {"per_step": self.settings.num_rows, "running": 1}.get(self.name, 0)

    def set(self, name: str | None) -> None:
        """Make every Meta BatchNorm layer of the model follow policy ``name``.

        ``per_step`` and ``running`` start their sets from the layers' ``running_mean`` and
        ``running_var``; other policies leave the layers' buffers as they are.
        """
        if name is not None and name not in BN_POLICIES:
            raise ValueError(f"bn must be one of {BN_POLICIES} or None, got {name!r}")
        trains = name in RUNNING_POLICIES
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
        self.settings.policy = name
        for layer in layers:
            layer.norm_settings = self.settings
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
            if isinstance(m, MetaBatchNormBase) and m.norm_settings is self.settings
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
        return training and self.name in RUNNING_POLICIES

    def check_modes(self, training: bool) -> None:
        """Raise if a BatchNorm would normalise with never-trained statistics at meta-training."""
        if not training or self.name in STATELESS_POLICIES:
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

    def at_query(
        self,
        record: bool = True,
        support_samples: int | None = None,
        steps_taken: int | None = None,
    ) -> contextlib.AbstractContextManager[None]:
        """The enclosed forwards are on the query sets (also the default outside MAML).

        ``record=False``: an extra query pass (the multi-step loss's, before the last step)
        whose statistics are not recorded: the query set's running statistics follow the
        final pass alone, the one meta-test normalises.
        ``support_samples`` (policy ``"support"``): each task's inputs are its
        ``support_samples`` support samples followed by its queries.
        ``steps_taken``: the inner steps before this pass (``query_row="last_step"``).
        """
        return self._at(None, record, support_samples, steps_taken)

    @property
    def normalises_by_support(self) -> bool:
        """Whether query passes must carry the support samples (policy ``"support"``)."""
        return self.name == "support"

    def _at(
        self,
        step: int | None,
        record: bool = True,
        support_samples: int | None = None,
        steps_taken: int | None = None,
    ):
        current = norm_step(self.settings)
        records = current.records if record else None
        position = dataclasses.replace(
            current,
            owner=self.settings,
            step=step,
            records=records,
            support_samples=support_samples,
            steps_taken=steps_taken,
        )
        return at_norm_step(position)

    @contextlib.contextmanager
    def meta_batch(self, training: bool) -> Iterator[None]:
        """Record each task's batch statistics in the enclosed forwards; commit them once after.

        Only when :meth:`trains_statistics`; a meta-batch that raises commits nothing.
        """
        if not self.trains_statistics(training):
            yield
            return
        records: list = []
        current = norm_step(self.settings)
        with at_norm_step(dataclasses.replace(current, owner=self.settings, records=records)):
            yield
        self.commit(records)

    def replaying(self) -> contextlib.AbstractContextManager[None]:
        """The enclosed forwards repeat ones already done (the inner-loop recomputation of
        :mod:`mamlext.maml.recompute`): they record no statistics and update no running
        statistics (``nn.BatchNorm``'s own updates with ``name=None`` included).
        """
        current = norm_step(self.settings)
        return at_norm_step(
            dataclasses.replace(current, owner=self.settings, records=None, replaying=True)
        )

    @torch.no_grad()
    def commit(self, records: list) -> None:
        """Move each recorded set one momentum step towards its mean over tasks.

        ``records``: ``(layer, row, (mean, var))`` in the order the layers recorded them.
        ``momentum=None``: a cumulative average over meta-batches, as ``nn.BatchNorm``'s.
        """
        by_layer: dict = {}  # {layer: {row: [(mean [n, C], var [n, C])]}}, in recording order
        for layer, row, stats in records:
            by_layer.setdefault(layer, {}).setdefault(row, []).append(stats)
        for layer, rows in by_layer.items():
            layer.num_batches_tracked.add_(1)
            tracked = float(layer.num_batches_tracked)
            momentum = 1.0 / tracked if layer.momentum is None else layer.momentum
            for row, stats in rows.items():
                mean = torch.cat([m for m, _ in stats]).mean(0)
                var = torch.cat([v for _, v in stats]).mean(0)
                layer.step_running_mean[row].lerp_(mean, momentum)
                layer.step_running_var[row].lerp_(var, momentum)
