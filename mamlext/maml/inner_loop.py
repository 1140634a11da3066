r"""MAML's inner loop: ``K`` SGD steps of the adapted parameters on a support set,

.. math:: \theta^{(k+1)} = \theta^{(k)} - \alpha^{(k)} \nabla_\theta
    \mathcal{L}(f_{\theta^{(k)}}(x), y), \qquad \theta^{(0)} = \theta,

for one task, or for all ``T`` tasks at once with ``[T, *shape]`` parameters. The graph
through the steps is kept (second order unless first order) or, with ``inner_checkpoint``,
recomputed in backward (:mod:`mamlext.maml.recompute`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mamlext.inner import inner_step
from mamlext.maml.batchnorm import BatchNormPolicy
from mamlext.maml.inputs import Inputs, tensors
from mamlext.maml.model_call import ModelCall
from mamlext.maml.recompute import checkpointed_inner_loop
from mamlext.maml.step_sizes import StepSizes
from mamlext.modules.norm import MetaBatchNormBase

# loss(model outputs, targets) of the support batch: one task's, or the sum over tasks
SupportLoss = Callable[[Tensor, Tensor], Tensor]
# after_step(k, parameters after step k): the multi-step loss's query passes
AfterStep = Callable[[int, "OrderedDict[str, Tensor]"], None]


class InnerLoop:
    """The inner SGD steps of the adapted parameters of ``model``.

    Args:
        model_call: the model, called with given parameters (a MetaModule's ``params=``, or
            any module's own forward through ``torch.func.functional_call``).
        adapted: names of the parameters to adapt (the others stay shared).
        step_sizes: the rate of each adapted tensor at each step.
        bn_policy: the BatchNorm policy, told which step each forward is.
        allow_unused: leave adapted parameters that the loss does not use unchanged.
    """

    def __init__(
        self,
        model_call: ModelCall,
        adapted: list[str],
        step_sizes: StepSizes,
        bn_policy: BatchNormPolicy,
        allow_unused: bool,
    ) -> None:
        self.model_call, self.adapted, self.step_sizes = model_call, adapted, step_sizes
        self.bn_policy, self.allow_unused = bn_policy, allow_unused

    @property
    def model(self) -> nn.Module:
        return self.model_call.model

    def run(
        self,
        x: Inputs,
        y: Tensor,
        steps: int,
        support_loss: SupportLoss,
        num_tasks: int | None,
        first_order: bool,
        inner_checkpoint: int | str | None,
        after_step: AfterStep | None = None,
    ) -> OrderedDict[str, Tensor]:
        """``steps`` updates from the meta-parameters on the support batch ``(x, y)``.

        Args:
            num_tasks: ``T`` for all tasks at once (``x`` is ``[T, N, ...]``; the adapted
                parameters become ``[T, *shape]``), ``None`` for one task (``[N, ...]``).
            after_step: called after each step (stored-graph path only).

        Returns:
            Every parameter by name: the adapted ones after the steps, the others as they are.
        """
        # Adaptation needs gradients even when the caller evaluates under no_grad (meta-test);
        # the graph through them is kept only when the caller can backpropagate.
        keeps_graph = torch.is_grad_enabled()
        second_order = keeps_graph and not first_order
        names = self.adapted
        with torch.enable_grad():
            fast = self.model_call.parameters()
            device = next(iter(fast.values())).device
            if num_tasks is not None:
                for name in names:
                    fast[name] = fast[name].expand(num_tasks, *fast[name].shape)

            def with_adapted(adapted: list[Tensor]) -> OrderedDict[str, Tensor]:
                params = OrderedDict(fast)
                params.update(zip(names, adapted))
                return params

            def step(adapted: list[Tensor], k: int, create_graph: bool) -> list[Tensor]:
                params = with_adapted(adapted)
                kernels = (
                    self.model_call.twice_differentiable(device)
                    if create_graph
                    else contextlib.nullcontext()
                )
                with self.bn_policy.at_step(k), kernels:
                    loss = support_loss(self.model_call(x, params, num_tasks), y)
                current = OrderedDict(zip(names, adapted))
                return inner_step(
                    loss, current, self.step_sizes.at(k), not create_graph, self.allow_unused
                )

            adapted = [fast[name] for name in names]
            if inner_checkpoint is None or not keeps_graph:
                for k in range(steps):
                    adapted = step(adapted, k, second_order)
                    if after_step is not None:
                        after_step(k, with_adapted(adapted))
            else:
                self._check_replayable()
                # everything the steps read that may require grad (inputs too: x.grad)
                inputs = [*self.model.parameters(), *self.step_sizes.parameters(), *tensors(x), y]
                adapted = checkpointed_inner_loop(
                    step, adapted, steps, inner_checkpoint, second_order, inputs,
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
