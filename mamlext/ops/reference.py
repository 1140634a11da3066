"""The op's pure-PyTorch kernel and its input contract (the checks every kernel runs).

``check_inputs`` mirrors ``check_fused_sgd_inputs`` in ``csrc/fused_sgd.h``, so that every
kernel rejects the same inputs with the same exception and message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor


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


def check_inputs(params, grads, lrs, lr_scalars) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first offending index, as the C++ checks."""
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
        if not broadcasts_to(lr.shape, p.shape):
            raise ValueError(
                f"mamlext.fused_sgd: lrs[{i}] of shape {tuple(lr.shape)} does not broadcast "
                f"to params[{i}] of shape {tuple(p.shape)}"
            )


def check_tensors(params: Sequence, grads: Sequence) -> None:
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


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def checked_reference_kernel(
    params: list[Tensor],
    grads: list[Tensor],
    lrs: list[Optional[Tensor]],
    lr_scalars: list[float],
) -> list[Tensor]:
    """The op's pure-PyTorch kernel: the input checks, then :func:`reference_fused_sgd`."""
    check_inputs(params, grads, lrs, lr_scalars)
    return reference_fused_sgd(params, grads, lrs, lr_scalars)
