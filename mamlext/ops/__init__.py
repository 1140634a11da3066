r"""The fused inner-loop update ``mamlext::fused_sgd``.

For a list of tensors (each may carry a leading task dimension ``[T, *shape]``)

.. math:: \mathrm{out}_i = p_i - \eta_i \, g_i

in one native call. The op is registered with ``torch.library`` (so ``opcheck``,
fake tensors and ``torch.compile`` work), has three kernels (this module's pure-PyTorch
reference, ``csrc/cpu``, ``csrc/cuda``) and one autograd formula, written with
differentiable torch ops so that second-order meta-gradients are exact:

.. math::
    \partial/\partial p_i = \bar o_i, \qquad
    \partial/\partial g_i = -\eta_i \bar o_i, \qquad
    \partial/\partial \eta_i = -\textstyle\sum_{\text{broadcast}} g_i \bar o_i .

That formula is written twice, both tested against the same float64 oracle and
gradgradcheck: in C++ (``csrc/autograd.h``, registered as ``AutogradCPU``/``AutogradCUDA``
by the native libraries: one C++ layer, the fast path), and in Python
(``_backward_formula``), used by the op's Python autograd rule and by ``_FusedSGD``, an
``autograd.Function`` with ``setup_context``/``jvp``/a generated vmap rule that
:func:`fused_sgd` takes where no native kernel serves (no compiler, other devices) and
while a ``torch.func`` transform or forward-mode AD is active.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from mamlext.ops._native import BackendStatus, backend_info, ensure_loaded

__all__ = ["fused_sgd", "reference_fused_sgd", "backend_info", "BackendStatus", "LearningRate"]

LearningRate = Union[float, Tensor, Sequence[Union[float, Tensor]]]


def reference_fused_sgd(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    lrs: Sequence[Optional[Tensor]],
    lr_scalars: Sequence[float],
) -> list[Tensor]:
    """The pure-PyTorch kernel: ``p - lr * g`` tensor by tensor (contiguous outputs).

    Half and bfloat16 are computed in float32 and rounded once, as the native kernels do.
    """
    outs = []
    for p, g, lr, scalar in zip(params, grads, lrs, lr_scalars):
        low_precision = p.dtype in (torch.float16, torch.bfloat16)
        if low_precision:
            p, g, lr = p.float(), g.float(), None if lr is None else lr.float()
        out = torch.add(p, g, alpha=-scalar) if lr is None else torch.addcmul(p, lr, g, value=-1)
        outs.append(out.to(params[len(outs)].dtype).contiguous())
    return outs


def _check_inputs(params, grads, lrs, lr_scalars) -> None:
    # Mirrors check_fused_sgd_inputs in csrc/fused_sgd.h, so every kernel rejects the
    # same inputs with the same exception and message.
    n = len(params)
    if not (len(grads) == len(lrs) == len(lr_scalars) == n):
        raise ValueError(
            "mamlext.fused_sgd: params, grads, lrs and lr_scalars must have the same length, "
            f"got {n}, {len(grads)}, {len(lrs)} and {len(lr_scalars)}"
        )
    for i, (p, g, lr) in enumerate(zip(params, grads, lrs)):
        if p.device != params[0].device:
            raise ValueError(
                f"mamlext.fused_sgd: params[{i}] is on {p.device} but params[0] is on "
                f"{params[0].device}; all tensors must be on one device"
            )
        if not p.is_floating_point():
            raise TypeError(
                f"mamlext.fused_sgd: params[{i}] has dtype {p.dtype}; "
                "only floating-point tensors can be updated"
            )
        if g.shape != p.shape:
            raise ValueError(
                f"mamlext.fused_sgd: grads[{i}] has shape {tuple(g.shape)} "
                f"but params[{i}] has shape {tuple(p.shape)}"
            )
        if g.dtype != p.dtype:
            raise TypeError(
                f"mamlext.fused_sgd: grads[{i}] has dtype {g.dtype} but params[{i}] has dtype {p.dtype}"
            )
        if g.device != p.device:
            raise ValueError(
                f"mamlext.fused_sgd: grads[{i}] is on {g.device} but params[{i}] is on {p.device}"
            )
        if lr is None:
            continue
        if lr.dtype != p.dtype:
            raise TypeError(
                f"mamlext.fused_sgd: lrs[{i}] has dtype {lr.dtype} but params[{i}] has dtype {p.dtype}"
            )
        if lr.device != p.device:
            raise ValueError(
                f"mamlext.fused_sgd: lrs[{i}] is on {lr.device} but params[{i}] is on {p.device}"
            )
        if not _broadcasts_to(lr.shape, p.shape):
            raise ValueError(
                f"mamlext.fused_sgd: lrs[{i}] of shape {tuple(lr.shape)} does not broadcast "
                f"to params[{i}] of shape {tuple(p.shape)}"
            )


def _check_tensors(params: Sequence, grads: Sequence) -> None:
    """Entries that are not tensors (a ``None`` gradient, above all), named by index."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if not isinstance(p, Tensor):
            raise TypeError(f"mamlext.fused_sgd: params[{i}] is a {type(p).__name__}, not a tensor")
        if g is None:
            raise ValueError(
                f"mamlext.fused_sgd: grads[{i}] is None: params[{i}] (shape {tuple(p.shape)}) "
                "received no gradient. Does the loss depend on it?"
            )
        if not isinstance(g, Tensor):
            raise TypeError(f"mamlext.fused_sgd: grads[{i}] is a {type(g).__name__}, not a tensor")


def _broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


SCHEMA = "(Tensor[] params, Tensor[] grads, Tensor?[] lrs, float[] lr_scalars) -> Tensor[]"


def checked_reference_kernel(
    params: list[Tensor],
    grads: list[Tensor],
    lrs: list[Optional[Tensor]],
    lr_scalars: list[float],
) -> list[Tensor]:
    """The op's pure-PyTorch kernel: the input checks, then :func:`reference_fused_sgd`."""
    _check_inputs(params, grads, lrs, lr_scalars)
    return reference_fused_sgd(params, grads, lrs, lr_scalars)


# The schema is spelled out (torch < 2.6 cannot infer one from list[Tensor] annotations).
_fused_sgd_op = torch.library.custom_op("mamlext::fused_sgd", mutates_args=(), schema=SCHEMA)(
    checked_reference_kernel
)


@_fused_sgd_op.register_fake
def _(params, grads, lrs, lr_scalars):
    _check_inputs(params, grads, lrs, lr_scalars)
    return [p.new_empty(p.shape) for p in params]


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


_fused_sgd_op.register_autograd(_op_backward, setup_context=_setup_op_context)


def _move_bdim(x: Optional[Tensor], bdim: Optional[int]) -> Optional[Tensor]:
    return x if x is None or bdim is None else x.movedim(bdim, 0)


@_fused_sgd_op.register_vmap
def _(info, in_dims, params, grads, lrs, lr_scalars):
    p_dims, g_dims, lr_dims, _ = in_dims
    size = info.batch_size
    batched_params, batched_grads, batched_lrs = [], [], []
    for i, (p, g, lr) in enumerate(zip(params, grads, lrs)):
        p = _move_bdim(p, p_dims[i] if p_dims else None)
        g = _move_bdim(g, g_dims[i] if g_dims else None)
        p_batched = p_dims is not None and p_dims[i] is not None
        g_batched = g_dims is not None and g_dims[i] is not None
        if not p_batched:
            p = p.expand(size, *p.shape)
        if not g_batched:
            g = g.expand(size, *g.shape)
        if lr is not None and lr_dims is not None and lr_dims[i] is not None:
            lr = _move_bdim(lr, lr_dims[i])
            # Align the unbatched lr shape with the unbatched param shape before the
            # batch dim is put in front: [B, *lr] -> [B, 1, ..., 1, *lr].
            lr = lr.reshape(size, *([1] * (p.dim() - lr.dim())), *lr.shape[1:])
        batched_params.append(p)
        batched_grads.append(g)
        batched_lrs.append(lr)
    outs = torch.ops.mamlext.fused_sgd(batched_params, batched_grads, batched_lrs, lr_scalars)
    return outs, [0] * len(outs)


class _FusedSGD(torch.autograd.Function):
    """``fused_sgd`` over flat tensor arguments, composable with ``torch.func``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(lr_scalars, lr_present, *tensors):
        params, grads, lrs = _split(tensors, lr_present)
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
        params_t, grads_t, lrs_t = _split(tangents, ctx.lr_present)
        return tuple(_jvp_formula(grads, lrs, ctx.lr_scalars, params_t, grads_t, lrs_t))


def _split(tensors: Sequence[Optional[Tensor]], lr_present: Sequence[bool]):
    """Flat ``(*params, *grads, *present_lrs)`` back to three per-tensor lists."""
    n = len(lr_present)
    params, grads, rest = list(tensors[:n]), list(tensors[n : 2 * n]), iter(tensors[2 * n :])
    lrs = [next(rest) if present else None for present in lr_present]
    return params, grads, lrs


def _normalize_lr(lr: LearningRate, params: Sequence[Tensor]):
    """Any accepted learning-rate form -> (per-tensor lr tensor or None, per-tensor float)."""
    n = len(params)
    if _rates_need_no_cast(lr, params):
        return list(lr), [1.0] * n
    if isinstance(lr, (Tensor, numbers.Real)):
        entries = [lr] * n
    elif isinstance(lr, Sequence) and not isinstance(lr, str):
        entries = list(lr)
        if len(entries) != n:
            raise ValueError(
                f"mamlext.fused_sgd: got {len(entries)} learning rates for {n} parameter tensors"
            )
    else:
        raise TypeError(
            "mamlext.fused_sgd: lr must be a float, a tensor, or a sequence of one float or "
            f"tensor per parameter tensor, got {type(lr).__name__}"
        )
    lrs: list[Optional[Tensor]] = []
    scalars: list[float] = []
    for i, (entry, p) in enumerate(zip(entries, params)):
        if isinstance(entry, Tensor):
            if entry.is_complex() or not (entry.is_floating_point() or entry.dim() == 0):
                raise TypeError(
                    f"mamlext.fused_sgd: lr[{i}] has dtype {entry.dtype}, expected a real "
                    "floating-point rate"
                )
            # A 0-dim rate behaves like a scalar: it may live on another device.
            device = p.device if entry.dim() == 0 else entry.device
            lrs.append(entry.to(device=device, dtype=p.dtype))
            scalars.append(1.0)
        elif isinstance(entry, numbers.Real) and not isinstance(entry, bool):
            lrs.append(None)
            scalars.append(float(entry))
        else:
            raise TypeError(
                f"mamlext.fused_sgd: lr[{i}] must be a float or a tensor, got {type(entry).__name__}"
            )
    return lrs, scalars


def _rates_need_no_cast(lr: LearningRate, params: Sequence[Tensor]) -> bool:
    """Whether ``lr`` is one tensor per ``params[i]``, of its dtype and device.

    The common Meta-SGD / MAML++ form, which then skips the per-entry ``.to()`` of
    :func:`_normalize_lr` (~15 us on Conv-4's 18 tensors); dtypes that are not floating
    point and shapes are left to the kernel's checks, which raise as the slow path would.
    """
    if not isinstance(lr, (list, tuple)) or len(lr) != len(params):
        return False
    for rate, p in zip(lr, params):
        if not isinstance(rate, Tensor) or rate.dtype != p.dtype or rate.device != p.device:
            return False
    return True


def fused_sgd(
    params: Sequence[Tensor], grads: Sequence[Optional[Tensor]], lr: LearningRate
) -> list[Tensor]:
    r"""One SGD step for a whole list of tensors: ``[p_i - lr_i * g_i for every i]``.

    One native call updates every tensor (every parameter of every task when the
    tensors carry a leading task dimension ``[T, *shape]``). Differentiable to any
    order in ``params``, ``grads`` and ``lr``; composes with ``torch.func``. Outputs are
    new contiguous tensors; inputs are never modified.

    Args:
        params: tensors ``p_i`` (floating point, any shape, all on one device).
        grads: ``g_i``, each of ``p_i``'s shape, dtype and device.
        lr: a float; a tensor broadcastable to every ``p_i`` (a 0-dim rate may be on
            any device); or a sequence with one float or tensor per ``p_i``: a per-layer
            rate (MAML++), a per-element rate of ``p_i``'s shape (Meta-SGD; with tasks,
            ``[*shape]`` for ``p_i`` of ``[T, *shape]`` is shared by them without a copy),
            or a per-task rate ``[T, 1, ..., 1]``. Real rate tensors are cast to ``p_i``'s
            dtype and may require grad (the meta-gradient reaches them).

    Returns:
        ``[p_i - lr_i * g_i]``, each of ``p_i``'s shape.

    Raises:
        ValueError, TypeError: naming the first offending index (checked once, by the
            kernel that runs).
    """
    params = params if isinstance(params, list) else list(params)
    grads = grads if isinstance(grads, list) else list(grads)
    n = len(params)
    if len(grads) != n:
        raise ValueError(f"mamlext.fused_sgd: got {n} params but {len(grads)} grads")
    if n == 0:
        return []
    try:
        if type(lr) is float:  # the common case needs no normalisation
            lrs, lr_scalars = [None] * n, [lr] * n
        else:
            lrs, lr_scalars = _normalize_lr(lr, params)
        # The C++ autograd rule serves where a native kernel does; elsewhere, and under
        # torch.func or forward-mode AD, _FusedSGD (the Python rule cannot route
        # gradients into lrs that hold a None).
        if ensure_loaded(params[0].device.type).kernel != "native" or _transforms_active():
            present = tuple(lr is not None for lr in lrs)
            tensors = [*params, *grads, *[lr for lr in lrs if lr is not None]]
            return list(_FusedSGD.apply(tuple(lr_scalars), present, *tensors))
        return _OP(params, grads, lrs, lr_scalars)
    except (TypeError, AttributeError, RuntimeError):
        _check_tensors(params, grads)  # a clearer message for non-tensor entries
        raise


_OP = torch.ops.mamlext.fused_sgd.default


def _transforms_active() -> bool:
    """Whether a ``torch.func`` transform or forward-mode AD needs ``_FusedSGD``."""
    return torch._C._functorch.maybe_current_level() is not None or _forward_ad._current_level >= 0
