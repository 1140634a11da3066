"""higher's differentiable SGD with the fused update: one native call per inner step.

``import mamlext.higher`` registers :class:`FusedDifferentiableSGD` for
``torch.optim.SGD``, so every ``higher.innerloop_ctx(model, torch.optim.SGD(...))``
uses it. Results equal higher's own ``DifferentiableSGD`` (momentum, dampening,
Nesterov, weight decay and per-group learning rates, tensors included).
"""

from __future__ import annotations

import higher
import higher.optim
import torch

from mamlext.inner import sgd_update

__all__ = ["FusedDifferentiableSGD", "register"]


class FusedDifferentiableSGD(higher.optim.DifferentiableOptimizer):
    """A differentiable SGD whose parameter update is one fused call (``mamlext.inner.sgd_update``)."""

    def _update(self, grouped_grads, **kwargs) -> None:
        where, params, grads, lrs = [], [], [], []
        for group_idx, (group, group_grads) in enumerate(zip(self.param_groups, grouped_grads)):
            for p_idx, (p, g) in enumerate(zip(group["params"], group_grads)):
                if g is None:
                    continue
                where.append((group, p_idx))
                params.append(p)
                grads.append(self._direction(group, group_idx, p_idx, p, g))
                lrs.append(group["lr"])
        for (group, p_idx), new in zip(where, sgd_update(params, grads, lrs)):
            group["params"][p_idx] = new

    def _direction(self, group, group_idx: int, p_idx: int, p: torch.Tensor, g: torch.Tensor):
        """The step direction: the gradient with weight decay and momentum, as torch.optim.SGD."""
        if group["weight_decay"] != 0:
            g = g + group["weight_decay"] * p
        momentum = group["momentum"]
        if momentum == 0:
            return g
        state = self.state[group_idx][p_idx]
        if "momentum_buffer" not in state:
            buf = g
        else:
            buf = state["momentum_buffer"] * momentum + (1 - group["dampening"]) * g
        state["momentum_buffer"] = buf
        return g + momentum * buf if group["nesterov"] else buf


def register() -> None:
    """Make higher use the fused SGD for ``torch.optim.SGD`` (done on import)."""
    higher.register_optim(torch.optim.SGD, FusedDifferentiableSGD)


register()
