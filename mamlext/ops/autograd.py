r"""The autograd rule of ``mamlext::fused_sgd``, written with differentiable torch ops so
that second-order meta-gradients are exact:

.. math::
    \partial/\partial p_i = \bar o_i, \qquad
    \partial/\partial g_i = -\eta_i \bar o_i, \qquad
    \partial/\partial \eta_i = -\textstyle\sum_{\text{broadcast}} g_i \bar o_i .

Here it serves the op's registered Python rule and :class:`FusedSGD`, the
``autograd.Function`` (with ``setup_context``, ``jvp`` and a generated vmap rule) that
composes with ``torch.func``. The same formula in C++ (``csrc/autograd.h``) serves where a
native kernel does; both are tested against one float64 oracle and gradgradcheck.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from mamlext.ops.library import fused_sgd_op


def _backward_formula(ctx, grad_outs: Sequence[Optional[Tensor]]):
    """Vector-Jacobian products w.r.t. (params, grads, lrs), from what
    :func:`_save_for_backward` kept in ``ctx``; differentiable itself.

    Returns three per-tensor lists (``None`` where no gradient flows: a rate that is absent,
    or a factor that was not saved because nothing needed it).
    """
    # (reading ctx.saved_tensors after a backward without retain_graph raises, even if empty)
    saved = iter(ctx.saved_tensors if ctx.rates_saved or ctx.grads_saved else ())
    rates = [next(saved) for _ in ctx.rate_shapes] if ctx.rates_saved else None
    grads = list(saved) if ctx.grads_saved else None
    grad_grads: list[Optional[Tensor]] = []
    grad_lrs: list[Optional[Tensor]] = []
    rate = 0  # index of entry i's rate among the present ones
    for i, (present, scalar, go) in enumerate(zip(ctx.lr_present, ctx.lr_scalars, grad_outs)):
        if go is None or not present:
            grad_grads.append(None if go is None else go * -scalar)
            grad_lrs.append(None)
            continue
        grad_grads.append(None if rates is None else -(rates[rate] * go))
        grad_lrs.append(
            None if grads is None else -(grads[i] * go).sum_to_size(ctx.rate_shapes[rate])
        )
        rate += 1
    return list(grad_outs), grad_grads, grad_lrs


def _jvp_formula(grads, lrs, lr_scalars, params_t, grads_t, lrs_t) -> list[Tensor]:
    """Tangents of the outputs: dp - lr * dg - dlr * g (missing tangents are zero)."""
    outs = []
    for g, lr, scalar, dp, dg, dlr in zip(grads, lrs, lr_scalars, params_t, grads_t, lrs_t):
        t = torch.zeros_like(g) if dp is None else dp.clone()
        if dg is not None:
            t = t - dg * scalar if lr is None else t - lr * dg
        if dlr is not None:
            t = t - dlr * g
        outs.append(t)
    return outs


def _setup_op_context(ctx, inputs, output) -> None:
    _, grads, lrs, lr_scalars = inputs
    if not all(lr is not None for lr in lrs) and any(
        lr is not None and lr.requires_grad for lr in lrs
    ):
        # torch.library cannot route gradients into a Tensor?[] that holds a None.
        raise ValueError(
            "torch.ops.mamlext.fused_sgd: learning-rate tensors that require grad need an "
            "lr tensor for every entry; call mamlext.fused_sgd, which handles mixed rates"
        )
    ctx.lr_scalars = list(lr_scalars)
    ctx.lr_present = [lr is not None for lr in lrs]
    _save_for_backward(ctx, grads, [lr for lr in lrs if lr is not None])


def _save_for_backward(ctx, grads: Sequence[Tensor], rates: Sequence[Tensor]) -> None:
    """Save each factor of ``lr * g`` only for the other's gradient, as torch's ``mul`` does.

    The rates if some grad needs its gradient (d/dg = -lr go), the grads if some rate does
    (d/dlr = -g go): the C++ rule's choice (``csrc/autograd.h``). Where nothing is saved
    (float rates, say), a second backward through the graph is valid, as through torch's
    ``add(p, g, alpha=-lr)``; elsewhere it raises torch's "backward through the graph a
    second time".
    """
    ctx.rates_saved = bool(rates) and any(g.requires_grad for g in grads)
    ctx.grads_saved = any(rate.requires_grad for rate in rates)
    ctx.rate_shapes = [rate.shape for rate in rates]
    ctx.save_for_backward(*(rates if ctx.rates_saved else ()), *(grads if ctx.grads_saved else ()))


def _op_backward(ctx, grad_outs):
    grad_params, grad_grads, grad_lrs = _backward_formula(ctx, grad_outs)
    # torch.library treats a Tensor?[] holding a None as one non-differentiable leaf.
    return grad_params, grad_grads, grad_lrs if all(ctx.lr_present) else None, None


fused_sgd_op.register_autograd(_op_backward, setup_context=_setup_op_context)


class FusedSGD(torch.autograd.Function):
    """``fused_sgd`` over flat tensor arguments, composable with ``torch.func``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(lr_scalars, lr_present, *tensors):
        params, grads, lrs = _split_flat(tensors, lr_present)
        return tuple(torch.ops.mamlext.fused_sgd(params, grads, lrs, lr_scalars))

    @staticmethod
    def setup_context(ctx, inputs, output):
        lr_scalars, lr_present, *tensors = inputs
        n = len(lr_present)
        ctx.lr_scalars, ctx.lr_present = lr_scalars, lr_present
        _save_for_backward(ctx, tensors[n : 2 * n], tensors[2 * n :])
        ctx.save_for_forward(*tensors[n:])

    @staticmethod
    def backward(ctx, *grad_outs):
        grad_params, grad_grads, grad_lrs = _backward_formula(ctx, grad_outs)
        grad_lrs = [g for g, present in zip(grad_lrs, ctx.lr_present) if present]
        return None, None, *grad_params, *grad_grads, *grad_lrs

    @staticmethod
    def jvp(ctx, _lr_scalars, _lr_present, *tangents):
        n = len(ctx.lr_present)
        grads, rates = ctx.saved_tensors[:n], iter(ctx.saved_tensors[n:])
        lrs = [next(rates) if present else None for present in ctx.lr_present]
        params_t, grads_t, lrs_t = _split_flat(tangents, ctx.lr_present)
        return tuple(_jvp_formula(grads, lrs, ctx.lr_scalars, params_t, grads_t, lrs_t))


def _split_flat(tensors: Sequence[Optional[Tensor]], lr_present: Sequence[bool]):
    """Flat ``(*params, *grads, *present_lrs)`` back to three per-tensor lists."""
    n = len(lr_present)
    params, grads, rest = list(tensors[:n]), list(tensors[n : 2 * n]), iter(tensors[2 * n :])
    lrs = [next(rest) if present else None for present in lr_present]
    return params, grads, lrs
