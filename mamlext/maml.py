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
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamlext.inner import inner_gradients
from mamlext.inner_checkpoint import check_setting, checkpointed_inner_loop
from mamlext.modules import batchable
from mamlext.modules.module import MetaModule
from mamlext.modules.norm import BatchNormPolicy, MetaBatchNormBase
from mamlext.ops import fused_sgd
from mamlext.step_sizes import StepSizes

LossFn = Callable[..., Tensor]
AfterStep = Callable[[int, "OrderedDict[str, Tensor]"], None]
# Measured on a 2-core CPU (benchmarks/RESULTS.md): batching all tasks wins on MAML's
# Omniglot 5-way 1-shot setting (10 samples per task) and loses from ~40 samples per task.
CPU_BATCHED_MAX_SAMPLES = 16


class MAML(nn.Module):
    """Meta-learn ``model``'s initialisation (and optionally its inner step sizes).

    Args:
        model: a :class:`~mamlext.modules.MetaModule` mapping ``[N, ...]`` inputs of one
            task to outputs (or ``[T, N, ...]`` task-batched).
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
        num_test_steps: inner steps in eval mode (meta-test); default ``num_steps``.
        batched: ``True`` adapts all tasks in one pass; ``False`` loops over tasks (any
            MetaModule, torchmeta's included); ``"auto"`` batches when every submodule is
            one mamlext knows how to batch and, on the CPU, when tasks are small (at most
            ``CPU_BATCHED_MAX_SAMPLES`` support + query samples per task: with larger tasks
            the CPU is compute-bound and the per-task loop measured faster, see
            ``benchmarks/RESULTS.md``).
        allow_unused: let adapted parameters that the loss does not use stay unchanged
            instead of raising.
        bn: the BatchNorm statistics policy of every Meta BatchNorm layer (see
            :class:`~mamlext.BatchNormPolicy` and ``docs/train_eval.md``):
            ``"transductive"`` (original MAML: batch statistics always, running ones never
            touched), ``"per_step"`` (MAML++), ``"running"``, or ``None`` to leave the
            layers as they are (``nn.BatchNorm`` semantics).
        per_sample_loss: whether ``loss_fn(outputs, targets, reduction="none")`` gives
            per-sample (or per-element) losses whose plain mean is ``loss_fn(outputs,
            targets)``; then all tasks' losses take one call, else one call per task.
            ``None`` detects it: true for torch's functional losses (``F.cross_entropy``,
            ``F.mse_loss``, ...) and ``functools.partial`` of them that bind none of
            ``reduction``, ``weight``, ``ignore_index`` (whose mean is not the plain one).
        bn_per_step_weights: MAML++'s BNWB: every Meta BatchNorm layer learns one weight
            and bias per inner step and one for the query pass (see
            :class:`~mamlext.BatchNormPolicy`), in the outer loop only.
        inner_checkpoint: activation checkpointing of the inner loop (not the training
            checkpoints of ``mamlext train``), for memory that does not grow with the
            steps: ``None`` stores every inner step's graph until backward; an int ``n``
            keeps only the state every ``n`` steps and recomputes each segment of ``n``
            steps, with its graph, during backward (the same meta-gradient, one more
            forward of each step); ``"auto"`` chooses ``n`` from the measured size of a
            step's graph (see :mod:`mamlext.inner_checkpoint` and ``docs/memory.md``).

    Attributes:
        bn_policy: the :class:`~mamlext.BatchNormPolicy` that owns the BatchNorm
            statistics (``maml.bn_policy.set(name)`` changes the policy).
        step_sizes: the :class:`~mamlext.StepSizes` (learned rates are its parameters).
    """

    def __init__(
        self,
        model: MetaModule,
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
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module) or not hasattr(model, "meta_named_parameters"):
            raise TypeError(
                f"MAML needs a MetaModule (forward(x, params=...)), got {type(model).__name__}; "
                "convert a plain nn.Module with mamlext.modules.metafy(model)"
            )
        if num_steps < 0 or (num_test_steps is not None and num_test_steps < 0):
            raise ValueError("num_steps and num_test_steps must be >= 0")
        if batched not in (True, False, "auto"):
            raise ValueError(f"batched must be True, False or 'auto', got {batched!r}")
        self.model = model
        self.num_steps = num_steps
        self.num_test_steps = num_steps if num_test_steps is None else num_test_steps
        self.first_order = first_order
        self.loss_fn = loss_fn
        self.per_sample_loss = (
            _plain_mean_loss(loss_fn) if per_sample_loss is None else bool(per_sample_loss)
        )
        self.allow_unused = allow_unused
        self.batched = batched
        self._batchable = batchable(model)
        if batched is True and not self._batchable:
            raise ValueError(
                "batched=True needs a model built only from mamlext's Meta layers and per-sample "
                "modules (a custom forward cannot be task-batched); use batched='auto' or False"
            )
        # The policy first: per-step BatchNorm weights replace the layers' own.
        self.bn_policy = BatchNormPolicy(model, bn, num_steps, bn_per_step_weights)
        meta = OrderedDict(model.meta_named_parameters())
        learned_outside = set(self.bn_policy.per_step_weight_names())
        self.adapted_names = [n for n in _select(meta, adapt_params) if n not in learned_outside]
        if not self.adapted_names:
            raise ValueError(
                "adapt_params selects only per-step BatchNorm weights, which are never adapted"
            )
        self.step_sizes = StepSizes(
            [meta[n] for n in self.adapted_names], step_size_mode, step_size, num_steps
        )
        self.inner_checkpoint = inner_checkpoint

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
        self, support_x: Tensor, support_y: Tensor, num_steps: int | None = None
    ) -> OrderedDict[str, Tensor]:
        """Adapt to every task of the meta-batch.

        Args:
            support_x: ``[T, N, ...]`` support inputs (``batch["train"][0]``).
            support_y: ``[T, N, ...]`` support targets.
            num_steps: inner steps; default ``num_steps`` (training) or ``num_test_steps``.

        Returns:
            Parameters by name: adapted ones ``[T, *shape]``, shared ones as they are.
        """
        num_tasks = _check_tasks(self.model, support_x=support_x, support_y=support_y)
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
            return self._adapt_batched(support_x, support_y, steps)
        per_task = [
            self._adapt_one(support_x[t], support_y[t], steps, task=t) for t in range(num_tasks)
        ]
        return OrderedDict(
            (
                name,
                torch.stack([p[name] for p in per_task]) if name in self.adapted_names else value,
            )
            for name, value in per_task[0].items()
        )

    def forward(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
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
        _check_tasks(
            self.model, support_x=support_x, support_y=support_y, query_x=query_x, query_y=query_y
        )
        versions = {name: p._version for name, p in self.model.named_parameters()}
        batched = self.use_batched(support_x, query_x)
        steps = self._steps(num_steps)
        weights = self._step_weights(step_weights, steps)
        self._check_modes()
        with self.bn_policy.meta_batch(self.training):
            loss, outputs = self._meta_loss(
                support_x, support_y, query_x, query_y, steps, batched, weights
            )
        if loss.grad_fn is not None:
            loss.grad_fn.register_prehook(self._in_place_guard(versions))
        return loss, outputs

    def meta_backward(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
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
        num_tasks = _check_tasks(
            self.model, support_x=support_x, support_y=support_y, query_x=query_x, query_y=query_y
        )
        batched = self.use_batched(support_x, query_x)
        if tasks_per_pass is None:
            tasks_per_pass = num_tasks if batched else 1
        steps = self._steps(num_steps)
        weights = self._step_weights(step_weights, steps)
        losses, outputs = [], []
        self._check_modes()
        with self.bn_policy.meta_batch(self.training):
            for start in range(0, num_tasks, tasks_per_pass):
                part = slice(start, start + tasks_per_pass)
                size = support_x[part].shape[0]
                loss, out = self._meta_loss(
                    support_x[part], support_y[part], query_x[part], query_y[part], steps,
                    batched, weights,
                )  # fmt: skip
                (loss * (size / num_tasks)).backward()
                losses.append(loss.detach() * size)
                outputs.append(out.detach())
        return torch.stack(losses).sum() / num_tasks, torch.cat(outputs)

    def use_batched(self, support_x: Tensor, query_x: Tensor | None = None) -> bool:
        """Whether this meta-batch is adapted task-batched (see ``batched``).

        The one place that decides; ``adapt``, ``forward`` and ``meta_backward`` ask once
        per meta-batch.
        """
        if self.batched != "auto":
            return bool(self.batched)
        samples = support_x.shape[1] + (0 if query_x is None else query_x.shape[1])
        return self._batchable and (
            support_x.device.type != "cpu" or samples <= CPU_BATCHED_MAX_SAMPLES
        )

    def _meta_loss(
        self, support_x, support_y, query_x, query_y, steps: int, batched: bool,
        step_weights: list[float] | None = None,
    ):  # fmt: skip
        """The query loss averaged over tasks (``step_weights``: the weighted sum over the
        steps of it) and the query outputs ``[T, Nq, ...]`` after the last step."""
        if batched:
            loss, outputs = self._adapt_and_query(
                support_x, support_y, query_x, query_y, steps, step_weights
            )
            return loss / support_x.shape[0], outputs
        losses, outputs = zip(
            *(
                self._adapt_and_query(xs, ys, xq, yq, steps, step_weights, task=t)
                for t, (xs, ys, xq, yq) in enumerate(zip(support_x, support_y, query_x, query_y))
            )
        )
        return torch.stack(losses).mean(), torch.stack(outputs)

    def _adapt_and_query(
        self, xs, ys, xq, yq, steps: int, step_weights: list[float] | None, task: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """One task (``task``), or all task-batched (``None``): the query loss summed over
        tasks (weighted over the steps with ``step_weights``) and the last query outputs."""

        def query_loss(params, final: bool = True) -> tuple[Tensor, Tensor]:
            with self.bn_policy.at_query(record=final):
                out = self.model(xq, params=params)
            if task is None:
                return self._task_losses(out, yq).sum(), out
            return self._task_loss(out, yq, task), out

        earlier: list[Tensor] = []  # the multi-step loss's terms before the last step

        def after_step(k: int, params) -> None:
            if k < steps - 1 and step_weights[k] != 0:  # a zero weight: no query pass
                earlier.append(step_weights[k] * query_loss(params, final=False)[0])

        hook = None if step_weights is None else after_step
        if task is None:
            fast = self._adapt_batched(xs, ys, steps, hook)
        else:
            fast = self._adapt_one(xs, ys, steps, task, hook)
        loss, outputs = query_loss(fast)
        if step_weights is not None:
            loss = sum(earlier, step_weights[-1] * loss)
        return loss, outputs

    def _step_weights(self, weights, steps: int) -> list[float] | None:
        """``step_weights`` checked: ``steps`` finite floats >= 0 (see ``forward``)."""
        if weights is None:
            return None
        if isinstance(weights, Tensor):
            if weights.dim() != 1 or weights.is_complex():
                raise ValueError(f"step_weights must be a 1-D real tensor, got {weights!r}")
            weights = weights.tolist()
        weights = [float(w) for w in weights]
        if steps == 0:
            raise ValueError("step_weights (the multi-step loss) needs at least one inner step")
        if len(weights) != steps:
            raise ValueError(
                f"step_weights has {len(weights)} weight(s), one per inner step is needed: "
                f"this call takes {steps} step(s)"
            )
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"step_weights must be finite and >= 0, got {weights}")
        if self.inner_checkpoint is not None and torch.is_grad_enabled():
            raise ValueError(
                "step_weights (the multi-step loss) needs every inner step's graph, which "
                "inner_checkpoint does not keep; set maml.inner_checkpoint = None"
            )
        return weights

    def _check_modes(self) -> None:
        if self.training and not torch.is_grad_enabled():
            warnings.warn(
                "MAML is in training mode under torch.no_grad(): the query loss has no graph, so "
                "backward() cannot give a meta-gradient. For meta-test evaluation use "
                "maml.eval() (no_grad is fine then); .eval() itself never turns gradients off",
                UserWarning,
                stacklevel=3,
            )
        self.bn_policy.check_modes(self.training)

    def _in_place_guard(self, versions: dict[str, int]):
        params = dict(self.model.named_parameters())

        def check(grad_outputs):
            changed = [n for n, v in versions.items() if params[n]._version != v]
            if changed:
                raise RuntimeError(
                    f"meta-parameters {changed} were modified in place after MAML's forward and "
                    "before loss.backward() (e.g. an optimizer.step() or an in-place SGD on the "
                    "model inside the inner loop). That is fine-tuning, not MAML: the meta-gradient "
                    "through the adaptation is lost. Adapt with maml.adapt() or "
                    "gradient_update_parameters(), which never modify the meta-parameters, and call "
                    "optimizer.step() after loss.backward()"
                )

        return check

    def _steps(self, num_steps: int | None) -> int:
        if num_steps is not None:
            if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
                raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}")
            return num_steps
        return self.num_steps if self.training else self.num_test_steps

    def _adapt_batched(
        self, x: Tensor, y: Tensor, steps: int, after_step: AfterStep | None = None
    ) -> OrderedDict[str, Tensor]:
        def expand(fast):
            for name in self.adapted_names:
                fast[name] = fast[name].expand(x.shape[0], *fast[name].shape)
            return fast

        def support_loss(out: Tensor, targets: Tensor) -> Tensor:
            return self._task_losses(out, targets).sum()

        return self._inner_loop(expand, steps, support_loss, x, y, after_step)

    def _adapt_one(
        self, x: Tensor, y: Tensor, steps: int, task: int, after_step: AfterStep | None = None
    ) -> OrderedDict[str, Tensor]:
        def support_loss(out: Tensor, targets: Tensor) -> Tensor:
            return self._task_loss(out, targets, task)

        return self._inner_loop(lambda fast: fast, steps, support_loss, x, y, after_step)

    def _inner_loop(
        self, start, steps: int, support_loss, x: Tensor, y: Tensor,
        after_step: AfterStep | None = None,
    ) -> OrderedDict[str, Tensor]:  # fmt: skip
        """``steps`` updates of the adapted parameters from ``start(meta-parameters)``, by
        ``support_loss(model(x, params), y)`` of the support batch ``(x, y)``;
        ``after_step(k, params)`` after each step ``k`` (stored-graph path only)."""
        # Adaptation needs gradients even when the caller evaluates under no_grad (meta-test);
        # the graph through them is kept only when the caller can backpropagate.
        keeps_graph = torch.is_grad_enabled()
        second_order = keeps_graph and not self.first_order
        names = self.adapted_names
        with torch.enable_grad():
            fast = start(OrderedDict(self.model.meta_named_parameters()))

            def with_adapted(adapted: list[Tensor]) -> OrderedDict[str, Tensor]:
                params = OrderedDict(fast)
                params.update(zip(names, adapted))
                return params

            def step(adapted: list[Tensor], k: int, create_graph: bool) -> list[Tensor]:
                params = with_adapted(adapted)
                with self.bn_policy.at_step(k):
                    loss = support_loss(self.model(x, params=params), y)
                current = OrderedDict(zip(names, adapted))
                grads = inner_gradients(loss, current, not create_graph, self.allow_unused)
                return fused_sgd(adapted, grads, self.step_sizes.at(k))

            adapted = [fast[name] for name in names]
            if self.inner_checkpoint is None or not keeps_graph:
                for k in range(steps):
                    adapted = step(adapted, k, second_order)
                    if after_step is not None:
                        after_step(k, with_adapted(adapted))
            else:
                self._check_replayable()
                # everything the steps read that may require grad (inputs too: x.grad)
                inputs = [*self.model.parameters(), *self.step_sizes.parameters(), x, y]
                adapted = checkpointed_inner_loop(
                    step, adapted, steps, self.inner_checkpoint, second_order, inputs,
                    self.bn_policy.replaying,
                )  # fmt: skip
            fast.update(zip(names, adapted))
        return fast

    def _check_replayable(self) -> None:
        """Refuse layers whose forward the recomputation in backward would repeat visibly."""
        for name, module in self.model.named_modules():
            foreign_bn = isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
                module, MetaBatchNormBase
            )
            if foreign_bn and module.training and module.track_running_stats:
                raise ValueError(
                    f"inner_checkpoint: {name!r} is a {type(module).__name__} that updates its "
                    "running statistics in every training forward, so the inner loop's "
                    "recomputation during backward would update them twice; use mamlext's "
                    "MetaBatchNorm (mamlext.modules.metafy converts a model) or "
                    "track_running_stats=False"
                )

    def _task_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Each task's mean loss, ``[T]``: one call over all tasks when the loss allows."""
        num_tasks = outputs.shape[0]
        if not self.per_sample_loss:
            return torch.stack(
                [self._task_loss(o, y, t) for t, (o, y) in enumerate(zip(outputs, targets))]
            )
        self._check_targets(outputs[0], targets[0])
        try:
            per_sample = self.loss_fn(
                outputs.flatten(0, 1), targets.flatten(0, 1), reduction="none"
            )
        except IndexError as error:
            _raise_label_error(outputs, targets, error)
        return per_sample.reshape(num_tasks, -1).mean(1)

    def _task_loss(self, outputs: Tensor, targets: Tensor, task: int) -> Tensor:
        """``loss_fn`` of one task's ``[N, ...]`` outputs and targets."""
        self._check_targets(outputs, targets)
        try:
            return self.loss_fn(outputs, targets)
        except IndexError as error:
            _raise_label_error(outputs[None], targets[None], error, first_task=task)

    def _check_targets(self, outputs: Tensor, targets: Tensor) -> None:
        """Refuse one task's float targets that torch's losses would broadcast to its outputs.

        (``[N]`` targets for ``[N, 1]`` outputs: an ``[N, N]`` loss mixing samples, and tasks
        on the task-batched path.) Only for the losses MAML knows (``per_sample_loss``).
        """
        if not (self.per_sample_loss and targets.is_floating_point()):
            return
        if outputs.shape != targets.shape and _base_loss(self.loss_fn) in _CLASS_INDEX_LOSSES:
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


def _base_loss(loss_fn: LossFn) -> LossFn:
    """The function inside any ``functools.partial`` wrappers."""
    while isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    return loss_fn


_CLASS_INDEX_LOSSES = (F.cross_entropy, F.nll_loss)  # targets: class indices (or probabilities)


def _plain_mean_loss(loss_fn: LossFn) -> bool:
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


def _select(meta: OrderedDict[str, Tensor], adapt_params) -> list[str]:
    if adapt_params is None:
        return list(meta)
    if callable(adapt_params):
        chosen = [n for n in meta if adapt_params(n)]
    else:
        wanted = [adapt_params] if isinstance(adapt_params, str) else list(adapt_params)
        unknown = [w for w in wanted if not any(n == w or n.startswith(w + ".") for n in meta)]
        if unknown:
            raise ValueError(
                f"adapt_params names no parameter: {unknown}; parameters: {list(meta)}"
            )
        chosen = [n for n in meta if any(n == w or n.startswith(w + ".") for w in wanted)]
    if not chosen:
        raise ValueError("adapt_params selects no parameter to adapt")
    return chosen


def _check_tasks(model: nn.Module, **tensors: Tensor) -> int:
    """The task count ``T`` shared by ``[T, N, ...]`` tensors; clear errors otherwise."""
    counts = {}
    takes_indices = any(isinstance(m, nn.Embedding) for m in model.modules())
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a tensor [T, N, ...], got {type(value).__name__}")
        if value.dim() < 2:
            raise ValueError(
                f"{name} must be [T, N, ...] (tasks, samples, ...), got shape {tuple(value.shape)}"
            )
        if name.endswith("_x") and not (value.is_floating_point() or takes_indices):
            raise TypeError(
                f"{name} has dtype {value.dtype}; the model expects floating-point inputs "
                "(convert images with .float())"
            )
        counts[name] = value.shape[0]
    if len(set(counts.values())) > 1:
        raise ValueError(f"support and query sets disagree on the number of tasks T: {counts}")
    if 0 in counts.values():
        raise ValueError("the meta-batch has no task (T = 0)")
    for name in ("support_x", "query_x"):
        if name in tensors and tensors[name].shape[1] == 0:
            raise ValueError(
                f"{name} has 0 samples per task: "
                + ("nothing to adapt on" if name == "support_x" else "the query loss would be NaN")
            )
    for kind in ("support", "query"):
        x, y = tensors.get(f"{kind}_x"), tensors.get(f"{kind}_y")
        if x is not None and y is not None and x.shape[1] != y.shape[1]:
            raise ValueError(
                f"{kind}_x has {x.shape[1]} samples per task but {kind}_y has {y.shape[1]}"
            )
    return next(iter(counts.values()))


def _raise_label_error(
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
