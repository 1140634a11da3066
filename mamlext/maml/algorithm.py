r"""MAML and its variants over a meta-batch of tasks, all tasks adapted at once.

For tasks :math:`t = 1..T` with support set :math:`S_t` and query set :math:`Q_t`:

.. math::
    \theta_t^{(k+1)} = \theta_t^{(k)} - \alpha^{(k)} \odot
        \nabla_\theta \mathcal{L}(f_{\theta_t^{(k)}}, S_t), \qquad
    \theta_t^{(0)} = \theta, \qquad
    \mathcal{L}_\text{meta} = \frac{1}{T} \sum_t \mathcal{L}(f_{\theta_t^{(K)}}, Q_t)

``loss.backward()`` gives the exact meta-gradient (second order unless ``first_order``)
with respect to :math:`\theta` and, when learned, the step sizes :math:`\alpha`.
Variants: FOMAML (``first_order=True``), Meta-SGD (``step_size_mode="per_element"``),
ANIL (``adapt_params``), and MAML++'s pieces: per-layer per-step rates
(``"per_layer_per_step"``), per-step BatchNorm statistics (``bn="per_step"``) and weights
(``bn_per_step_weights``), the multi-step loss (``step_weights``: :math:`\sum_k w_k
\mathcal{L}(f_{\theta_t^{(k)}}, Q_t)` over the steps :math:`k = 1..K`), and
derivative-order annealing (``first_order`` may change between calls).

Longer than 350 lines: :class:`MAML`'s docstring documents every variant's argument (about
65 lines) and each of its five entry points (``forward``, ``meta_backward``, ``adapt``,
``predict``, ``prepare``) documents its shapes; the code is those entry points and the query
passes, the inner loop, each task's loss, the checks and the BatchNorm policy living in their
own modules.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamlext.maml.batchnorm import BatchNormPolicy
from mamlext.maml.checks import (
    check_step_count,
    check_step_weights,
    check_tasks,
    in_place_guard,
    select_adapted,
    warn_if_no_graph,
)
from mamlext.maml.inner_loop import InnerLoop
from mamlext.maml.inputs import Inputs, concat_samples, num_samples, take, tensors
from mamlext.maml.losses import LossFn, TaskLoss
from mamlext.maml.model_call import model_call
from mamlext.maml.recompute import check_setting
from mamlext.maml.step_sizes import StepSizes

# Measured on a 2-core CPU (benchmarks/RESULTS.md): batching all tasks wins on MAML's
# Omniglot 5-way 1-shot setting (10 samples per task) and loses from ~40 samples per task.
CPU_BATCHED_MAX_SAMPLES = 16
LOG = logging.getLogger("mamlext")


@dataclasses.dataclass(frozen=True)
class MetaBatch:
    """What a call decided about its meta-batch (:meth:`MAML.prepare`)."""

    num_tasks: int
    batched: bool  # all tasks in one pass, or task by task
    steps: int  # inner steps
    step_weights: list[float] | None  # the multi-step loss's weights, or None


class MAML(nn.Module):
    """Meta-learn ``model``'s initialisation (and optionally its inner step sizes).

    Args:
        model: any ``nn.Module`` mapping one task's ``[N, ...]`` inputs to outputs. A
            :class:`~mamlext.modules.MetaModule` (mamlext's or torchmeta's layers) takes the
            adapted parameters as ``params=`` and runs all tasks at once where its layers
            can; any other module runs its own ``forward`` with them through
            ``torch.func.functional_call`` (its torch BatchNorm layers become mamlext's, a
            subclass, so that ``bn=`` reaches them; names and buffers are kept). Inputs may
            be one tensor, or several as a tuple (positional arguments of ``forward``) or a
            dict (keyword arguments), each ``[T, N, ...]``.
        step_size: the inner learning rate :math:`\\alpha` (the initial value when learned).
        num_steps: inner gradient steps during meta-training.
        first_order: FOMAML: do not differentiate through the inner gradients.
        loss_fn: ``loss_fn(outputs, targets)`` of one task, a mean over its samples
            (``F.cross_entropy``, ``F.mse_loss``, ...).
        step_size_mode: ``"fixed"``; ``"per_element"`` (Meta-SGD: a learned rate for every
            parameter element); ``"per_layer_per_step"`` (MAML++: a learned rate for each
            parameter tensor and step). See :class:`~mamlext.StepSizes`.
        adapt_params: names (or prefixes such as ``"classifier"``) of the parameters to
            adapt, or a predicate on names; the others stay shared (ANIL). Default: all.
            Parameters with ``requires_grad=False`` (a frozen submodule) are never adapted.
        num_test_steps: inner steps in eval mode (meta-test); default ``num_steps``.
        batched: ``True`` adapts all tasks in one pass; ``False`` loops over tasks;
            ``"auto"`` batches when the model allows it exactly (a MetaModule of layers
            mamlext knows how to batch; another module under ``torch.func.vmap``, without
            recurrent layers or BatchNorm that updates running statistics) and, on the CPU,
            when tasks are small (at most ``CPU_BATCHED_MAX_SAMPLES`` support + query
            samples per task: with larger tasks the CPU is compute-bound and the per-task
            loop measured faster, see ``benchmarks/RESULTS.md``). ``maml.use_batched(xs,
            xq)`` says which path a meta-batch takes.
        allow_unused: let adapted parameters that the loss does not use stay unchanged
            instead of raising.
        bn: the BatchNorm statistics policy of every Meta BatchNorm layer (see
            :class:`~mamlext.BatchNormPolicy` and ``docs/train_eval.md``):
            ``"transductive"`` (original MAML: batch statistics always, running ones never
            touched), ``"support"`` (each query normalised with its task's support
            statistics: no dependence on the other queries), ``"per_step"`` (MAML++),
            ``"running"``, or ``None`` to leave the layers as they are (``nn.BatchNorm``
            semantics).
        per_sample_loss: whether ``loss_fn(outputs, targets, reduction="none")`` gives
            per-sample (or per-element) losses whose plain mean is ``loss_fn(outputs,
            targets)``; then all tasks' losses take one call, else one call per task.
            ``None`` detects it: true for torch's functional losses (``F.cross_entropy``,
            ``F.mse_loss``, ...) and ``functools.partial`` of them that bind none of
            ``reduction``, ``weight``, ``ignore_index`` (whose mean is not the plain one).
        bn_per_step_weights: MAML++'s BNWB: every Meta BatchNorm layer learns one weight
            and bias per inner step and one for the query pass (see
            :class:`~mamlext.BatchNormPolicy`), in the outer loop only.
        bn_query_row: which row of per-step BatchNorm weights and statistics a query pass
            uses: ``"own"``, one of its own; ``"last_step"``, that of the inner step just
            taken, as MAML++'s authors' code does (``docs/mamlpp.md``).
        inner_checkpoint: activation checkpointing of the inner loop (not the training
            checkpoints of ``mamlext train``), for memory that does not grow with the
            steps: ``None`` stores every inner step's graph until backward; an int ``n``
            keeps only the state every ``n`` steps and recomputes each segment of ``n``
            steps, with its graph, during backward (the same meta-gradient, one more
            forward of each step); ``"auto"`` chooses ``n`` from the measured size of a
            step's graph (see :mod:`mamlext.maml.recompute` and ``docs/memory.md``).

    Attributes:
        bn_policy: the :class:`~mamlext.BatchNormPolicy` that owns the BatchNorm
            statistics (``maml.bn_policy.set(name)`` changes the policy).
        step_sizes: the :class:`~mamlext.StepSizes` (learned rates are its parameters).
    """

    def __init__(
        self,
        model: nn.Module,
        step_size: float = 0.4,
        num_steps: int = 1,
        first_order: bool = False,
        loss_fn: LossFn = F.cross_entropy,
        step_size_mode: str = "fixed",
        adapt_params: Iterable[str] | Callable[[str], bool] | None = None,
        num_test_steps: int | None = None,
        batched: bool | str = "auto",
        allow_unused: bool = False,
        bn: str | None = "transductive",
        per_sample_loss: bool | None = None,
        bn_per_step_weights: bool = False,
        inner_checkpoint: int | str | None = None,
        bn_query_row: str = "own",
    ) -> None:
        super().__init__()
        self.model_call = model_call(model)  # the torch BatchNorm of a plain model become Meta ones
        if num_steps < 0 or (num_test_steps is not None and num_test_steps < 0):
            raise ValueError("num_steps and num_test_steps must be >= 0")
        if batched not in (True, False, "auto"):
            raise ValueError(f"batched must be True, False or 'auto', got {batched!r}")
        self.model = model
        self.num_steps = num_steps
        self.num_test_steps = num_steps if num_test_steps is None else num_test_steps
        self.first_order = first_order
        self.task_loss = TaskLoss(loss_fn, per_sample_loss)
        self.batched = batched
        # The policy first: per-step BatchNorm weights replace the layers' own.
        self.bn_policy = BatchNormPolicy(model, bn, num_steps, bn_per_step_weights, bn_query_row)
        if batched is True and not self.model_call.can_batch(bn):
            raise ValueError(self.model_call.cannot_batch)
        meta = self.model_call.parameters()
        learned_outside = set(self.bn_policy.per_step_weight_names())
        self.adapted_names = [
            n
            for n in select_adapted(meta, adapt_params)
            if n not in learned_outside and meta[n].requires_grad  # frozen: never adapted
        ]
        if not self.adapted_names:
            raise ValueError(
                "adapt_params selects only per-step BatchNorm weights or frozen parameters "
                "(requires_grad=False), which are never adapted"
            )
        self.step_sizes = StepSizes(
            [meta[n] for n in self.adapted_names], step_size_mode, step_size, num_steps
        )
        self.inner_loop = InnerLoop(
            self.model_call, self.adapted_names, self.step_sizes, self.bn_policy, allow_unused
        )
        self.inner_checkpoint = inner_checkpoint
        self._reads_checked = False  # the forward reads the adapted tensors (once per MAML)

    @property
    def loss_fn(self) -> LossFn:
        """``loss_fn(outputs, targets)`` of one task."""
        return self.task_loss.loss_fn

    @property
    def per_sample_loss(self) -> bool:
        """Whether all tasks' losses take one call (see ``per_sample_loss`` above)."""
        return self.task_loss.per_sample

    @property
    def allow_unused(self) -> bool:
        return self.inner_loop.allow_unused

    @property
    def inner_checkpoint(self) -> int | str | None:
        """The inner loop's activation checkpointing: ``None``, ``"auto"`` or a segment length;
        may change between calls (it changes memory and time, not results)."""
        return self._inner_checkpoint

    @inner_checkpoint.setter
    def inner_checkpoint(self, setting: int | str | None) -> None:
        check_setting(setting)
        self._inner_checkpoint = setting

    @property
    def bn(self) -> str | None:
        """The BatchNorm policy's name (``bn_policy.name``)."""
        return self.bn_policy.name

    # ---- adaptation -------------------------------------------------------------------

    def adapt(
        self, support_x: Inputs, support_y: Tensor, num_steps: int | None = None
    ) -> OrderedDict[str, Tensor]:
        """Adapt to every task of the meta-batch.

        Args:
            support_x: ``[T, N, ...]`` support inputs (``batch["train"][0]``).
            support_y: ``[T, N, ...]`` support targets.
            num_steps: inner steps; default ``num_steps`` (training) or ``num_test_steps``.

        Returns:
            Parameters by name: adapted ones ``[T, *shape]``, shared ones as they are.
        """
        num_tasks = check_tasks(self.model, support_x=support_x, support_y=support_y)
        if self.bn_policy.trains_statistics(self.training):
            raise ValueError(
                f"maml.adapt() in training mode cannot train bn={self.bn!r}'s running statistics "
                "(they need the query forward too, and are committed once per meta-batch): "
                "meta-train with maml(xs, ys, xq, yq) or maml.meta_backward(...), call maml.eval() "
                "to adapt at meta-test, or use bn='transductive'"
            )
        self._check_modes()
        steps = self._steps(num_steps)
        if self.use_batched(support_x):
            return self._adapt(support_x, support_y, steps)
        per_task = [
            self._adapt(take(support_x, t), support_y[t], steps, task=t) for t in range(num_tasks)
        ]
        return OrderedDict(
            (
                name,
                torch.stack([p[name] for p in per_task]) if name in self.adapted_names else value,
            )
            for name, value in per_task[0].items()
        )

    def predict(
        self,
        params: OrderedDict[str, Tensor],
        query_x: Inputs,
        support_x: Inputs | None = None,
        num_steps: int | None = None,
    ) -> Tensor:
        """The model's outputs ``[T, Nq, ...]`` on the query sets with parameters ``params``
        from :meth:`adapt`, normalised as the BatchNorm policy says.

        Args:
            params: :meth:`adapt`'s result (adapted parameters ``[T, *shape]``).
            query_x: ``[T, Nq, ...]`` query inputs.
            support_x: the support inputs given to :meth:`adapt`; needed by ``bn="support"``
                (whose queries are normalised with their support set's statistics).
            num_steps: the inner steps ``adapt`` took (as its argument, with the same
                default); with ``bn_query_row="last_step"`` the query uses that step's row.
        """
        steps = self._steps(num_steps)
        if self.bn_policy.normalises_by_support and support_x is None:
            raise ValueError(
                "bn='support' normalises queries with the support statistics: pass "
                "support_x, the inputs given to adapt()"
            )
        given = (
            {"query_x": query_x}
            if support_x is None
            else {"support_x": support_x, "query_x": query_x}
        )
        num_tasks = check_tasks(self.model, **given)
        if self.use_batched(*given.values()):
            return self._query_outputs(params, query_x, support_x, num_tasks, steps, False)
        return torch.stack([
            self._query_outputs(
                OrderedDict(
                    (n, v[t] if n in self.adapted_names else v) for n, v in params.items()
                ),
                take(query_x, t), None if support_x is None else take(support_x, t), None, steps,
                False,
            ) for t in range(num_tasks)
        ])  # fmt: skip

    def forward(
        self,
        support_x: Inputs,
        support_y: Tensor,
        query_x: Inputs,
        query_y: Tensor,
        num_steps: int | None = None,
        step_weights: Sequence[float] | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""Adapt on the support sets and evaluate on the query sets.

        Args:
            step_weights: the multi-step loss (MAML++'s MSL): ``K`` weights :math:`w_k`, one
                per inner step of this call; the loss is then :math:`\sum_k w_k` times the
                query loss after step ``k`` (``mamlext.schedules.multi_step_weights``: the
                paper's schedule). ``None``: the query loss after the last step alone.

        Returns:
            ``(loss, outputs)``: the query loss averaged over tasks (backward gives the
            meta-gradient) and the query outputs ``[T, Nq, ...]`` after the last step.
        """
        versions = {name: p._version for name, p in self.model.named_parameters()}
        batch = self.prepare(support_x, support_y, query_x, query_y, num_steps, step_weights)
        with self.bn_policy.meta_batch(self.training):
            loss, outputs = self._meta_loss(support_x, support_y, query_x, query_y, batch)
        if loss.grad_fn is not None:
            loss.grad_fn.register_prehook(in_place_guard(self.model, versions))
        return loss, outputs

    def meta_backward(
        self,
        support_x: Inputs,
        support_y: Tensor,
        query_x: Inputs,
        query_y: Tensor,
        num_steps: int | None = None,
        tasks_per_pass: int | None = None,
        step_weights: Sequence[float] | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``forward`` then ``backward``, in passes of ``tasks_per_pass`` tasks.

        The meta-gradients accumulated into ``.grad`` equal those of
        ``maml(...)[0].backward()``, but only one pass's graph is alive at a time: the
        peak memory of a per-task loop with per-task backward (as higher's examples do).
        Default: all tasks in one pass on the task-batched path, one task per pass on the
        per-task path.

        Returns:
            ``(loss, outputs)`` as ``forward``, detached.
        """
        batch = self.prepare(support_x, support_y, query_x, query_y, num_steps, step_weights)
        if tasks_per_pass is None:
            tasks_per_pass = batch.num_tasks if batch.batched else 1
        losses, outputs = [], []
        with self.bn_policy.meta_batch(self.training):
            for start in range(0, batch.num_tasks, tasks_per_pass):
                part = slice(start, start + tasks_per_pass)
                size = support_y[part].shape[0]
                loss, out = self._meta_loss(
                    take(support_x, part), support_y[part], take(query_x, part), query_y[part],
                    batch,
                )  # fmt: skip
                (loss * (size / batch.num_tasks)).backward()
                losses.append(loss.detach() * size)
                outputs.append(out.detach())
        return torch.stack(losses).sum() / batch.num_tasks, torch.cat(outputs)

    def prepare(
        self,
        support_x: Inputs,
        support_y: Tensor,
        query_x: Inputs,
        query_y: Tensor,
        num_steps: int | None = None,
        step_weights: Sequence[float] | Tensor | None = None,
    ) -> MetaBatch:
        """Check a meta-batch and decide how it runs (``forward`` and ``meta_backward``)."""
        num_tasks = check_tasks(
            self.model, support_x=support_x, support_y=support_y, query_x=query_x, query_y=query_y
        )
        batched = self.use_batched(support_x, query_x)
        steps = self._steps(num_steps)
        recomputed = self.inner_checkpoint is not None and torch.is_grad_enabled()
        weights = check_step_weights(step_weights, steps, recomputed)
        if torch.is_grad_enabled() and not self.first_order and steps > 0:
            self.model_call.check_second_order()
        self._check_modes(stacklevel=4)
        LOG.debug(
            "MAML: %d tasks %s, %d inner steps, model called as %s", num_tasks,
            "at once" if batched else "one by one", steps, self.model_call.kind,
        )  # fmt: skip
        return MetaBatch(num_tasks, batched, steps, weights)

    def extra_repr(self) -> str:
        return (
            f"model_call={self.model_call.kind!r}, batched={self.batched!r}, "
            f"num_steps={self.num_steps}, first_order={self.first_order}, bn={self.bn!r}"
        )

    def use_batched(self, support_x: Inputs, query_x: Inputs | None = None) -> bool:
        """Whether a meta-batch runs task-batched (``batched``; ``"auto"``: see above).

        The one place that decides; ``adapt``, ``forward`` and ``meta_backward`` ask once
        per meta-batch.
        """
        if self.batched != "auto":
            return bool(self.batched)
        samples = num_samples(support_x) + (0 if query_x is None else num_samples(query_x))
        on_cpu = tensors(support_x)[0].device.type == "cpu"
        return self.model_call.can_batch(self.bn) and (
            not on_cpu or samples <= CPU_BATCHED_MAX_SAMPLES
        )

    def _meta_loss(self, support_x, support_y, query_x, query_y, batch: MetaBatch):
        """The query loss averaged over tasks (with step weights: the weighted sum over the
        steps of it) and the query outputs ``[T, Nq, ...]`` after the last step."""
        if batch.batched:
            loss, outputs = self._adapt_and_query(support_x, support_y, query_x, query_y, batch)
            return loss / support_y.shape[0], outputs
        losses, outputs = zip(
            *(
                self._adapt_and_query(
                    take(support_x, t), support_y[t], take(query_x, t), query_y[t], batch, task=t
                )
                for t in range(support_y.shape[0])
            )
        )
        return torch.stack(losses).mean(), torch.stack(outputs)

    def _adapt_and_query(
        self, xs, ys, xq, yq, batch: MetaBatch, task: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """One task (``task``), or all task-batched (``None``): the query loss summed over
        tasks (weighted over the steps with step weights) and the last query outputs."""
        step_weights = batch.step_weights

        num_tasks = None if task is not None else yq.shape[0]

        def query_loss(params, steps_taken: int, final: bool = True) -> tuple[Tensor, Tensor]:
            out = self._query_outputs(params, xq, xs, num_tasks, steps_taken, record=final)
            if not (self._reads_checked or self.allow_unused) and torch.is_grad_enabled():
                self.model_call.check_reads(out, {n: params[n] for n in self.adapted_names})
                self._reads_checked = True
            if task is None:
                return self.task_loss.per_task(out, yq).sum(), out
            return self.task_loss.one(out, yq, task), out

        earlier: list[Tensor] = []  # the multi-step loss's terms before the last step

        def after_step(k: int, params) -> None:
            if k < batch.steps - 1 and step_weights[k] != 0:  # a zero weight: no query pass
                earlier.append(step_weights[k] * query_loss(params, k + 1, final=False)[0])

        hook = None if step_weights is None else after_step
        fast = self._adapt(xs, ys, batch.steps, task, hook)
        loss, outputs = query_loss(fast, batch.steps)
        if step_weights is not None:
            loss = sum(earlier, step_weights[-1] * loss)
        return loss, outputs

    def _query_outputs(
        self, params, xq, xs, num_tasks: int | None, steps_taken: int, record: bool = True
    ):
        """The model's outputs on the query inputs ``xq`` (one task's, or all tasks' when
        ``num_tasks``) after ``steps_taken`` inner steps; with ``bn="support"`` the support
        inputs ``xs`` run with them, and their statistics normalise both."""
        if not self.bn_policy.normalises_by_support:
            with self.bn_policy.at_query(record=record, steps_taken=steps_taken):
                return self.model_call(xq, params, num_tasks)
        sample_dim = 0 if num_tasks is None else 1
        support = tensors(xs)[0].shape[sample_dim]
        both = concat_samples(xs, xq, sample_dim)
        with self.bn_policy.at_query(record, support, steps_taken):
            out = self.model_call(both, params, num_tasks)
        return out.narrow(sample_dim, support, out.shape[sample_dim] - support)

    def _adapt(self, x: Tensor, y: Tensor, steps: int, task: int | None = None, after_step=None):
        """The inner loop on one task's support batch (``task``) or all tasks' (``None``)."""
        if task is None:

            def support_loss(out: Tensor, targets: Tensor) -> Tensor:
                return self.task_loss.per_task(out, targets).sum()

        else:

            def support_loss(out: Tensor, targets: Tensor) -> Tensor:
                return self.task_loss.one(out, targets, task)

        num_tasks = y.shape[0] if task is None else None
        return self.inner_loop.run(
            x, y, steps, support_loss, num_tasks, self.first_order, self.inner_checkpoint,
            after_step,
        )  # fmt: skip

    def _steps(self, num_steps: int | None) -> int:
        if num_steps is not None:
            return check_step_count(num_steps)
        return self.num_steps if self.training else self.num_test_steps

    def _check_modes(self, stacklevel: int = 3) -> None:
        warn_if_no_graph(self.training, stacklevel + 1)
        self.bn_policy.check_modes(self.training)
