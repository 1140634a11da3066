r"""One inner-loop step, the one place where MAML's inner SGD is written:
:math:`\theta' = \theta - \alpha \nabla_\theta \mathcal{L}`, the gradient kept differentiable
(second order) unless first order, the update one fused call. Used by
:func:`gradient_update_parameters`, :class:`mamlext.MAML`'s inner loop and the higher drop-in
(:mod:`mamlext.higher`, which brings its own step directions).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mamlext.modules.module import MetaModule
from mamlext.ops import LearningRate, fused_sgd

StepSize = float | Tensor | Mapping[str, float | Tensor]


class InnerGradientError(RuntimeError, ValueError):
    """The inner-loop loss cannot be differentiated with respect to the adapted parameters.

    A ``RuntimeError``, as ``torch.autograd.grad`` (and so torchmeta's
    ``gradient_update_parameters``) raises there, and a ``ValueError``, as mamlext raised.
    """


class UnusedParameterError(InnerGradientError):
    """The inner-loop loss does not depend on some of the adapted parameters."""


def inner_gradients(
    loss: Tensor,
    params: Mapping[str, Tensor],
    first_order: bool = False,
    allow_unused: bool = False,
) -> list[Tensor]:
    """``d loss / d params``, keeping the graph for second order unless ``first_order``.

    Raises:
        InnerGradientError: the loss has no graph (e.g. computed under ``torch.no_grad()``).
        UnusedParameterError: the loss does not depend on some parameter and
            ``allow_unused`` is false.
    """
    if not loss.requires_grad:
        raise InnerGradientError(
            "the inner-loop loss has no graph to the parameters: was it computed under "
            "torch.no_grad() or from detached parameters? (.eval() does not stop gradients; "
            "torch.no_grad() does)"
        )
    names, tensors = list(params), list(params.values())
    grads = torch.autograd.grad(loss, tensors, create_graph=not first_order, allow_unused=True)
    unused = [name for name, g in zip(names, grads) if g is None]
    if unused and not allow_unused:
        raise UnusedParameterError(
            f"the inner-loop loss does not depend on {unused}; adapt only the parameters it "
            "uses: pass gradient_update_parameters a params= dict without these and merge "
            "its result into the full parameter dict for the next forward (in mamlext.MAML: "
            "adapt_params=, or allow_unused=True to leave them unchanged)"
        )
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


def sgd_update(
    params: Sequence[Tensor], directions: Sequence[Tensor], lr: LearningRate
) -> list[Tensor]:
    r"""``[p_i - lr_i * d_i]`` in one fused call, differentiable in ``p``, ``d`` and ``lr``."""
    return fused_sgd(params, directions, lr)


def inner_step(
    loss: Tensor,
    params: Mapping[str, Tensor],
    lr: LearningRate,
    first_order: bool = False,
    allow_unused: bool = False,
) -> list[Tensor]:
    r"""``[\theta - \alpha \nabla_\theta loss]`` for the tensors of ``params``, in their order.

    Raises:
        InnerGradientError, UnusedParameterError: as :func:`inner_gradients`.
    """
    grads = inner_gradients(loss, params, first_order, allow_unused)
    return sgd_update(list(params.values()), grads, lr)


def gradient_update_parameters(
    model: MetaModule,
    loss: Tensor,
    params: Mapping[str, Tensor] | None = None,
    step_size: StepSize = 0.5,
    first_order: bool = False,
) -> OrderedDict[str, Tensor]:
    r"""One gradient step on ``params``, torchmeta's function with the fused update.

    .. math:: \theta'_k = \theta_k - \alpha_k \nabla_{\theta_k} \mathcal{L}

    Args:
        model: the MetaModule whose parameters are updated (its own if ``params`` is None).
        loss: the inner-loop loss, a scalar depending on ``params``.
        params: current parameters by name (possibly task-batched ``[T, *shape]``).
        step_size: a float, a tensor (learnable), or a dict of either by parameter name.
        first_order: drop the second-order terms (FOMAML): the gradient is not
            differentiated through.

    Returns:
        The updated parameters, by name, in ``params``' order.

    Raises:
        InnerGradientError: the loss has no graph to ``params``.
        UnusedParameterError: the loss does not depend on some of ``params``.
    """
    if not hasattr(model, "meta_named_parameters"):  # mamlext's or torchmeta's MetaModule
        raise TypeError(f"model must be a MetaModule, got {type(model).__name__}")
    if params is None:
        params = OrderedDict(model.meta_named_parameters())
    lr: LearningRate
    if isinstance(step_size, Mapping):
        missing = [name for name in params if name not in step_size]
        if missing:
            raise KeyError(f"step_size has no entry for {missing}")
        lr = [step_size[name] for name in params]
    else:
        lr = step_size
    return OrderedDict(zip(params, inner_step(loss, params, lr, first_order)))
