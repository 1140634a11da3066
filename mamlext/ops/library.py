"""The op ``mamlext::fused_sgd``: its schema (stated here alone), registered with
``torch.library`` over the pure-PyTorch kernel, with its fake (shape) kernel and vmap rule.

The native libraries (``csrc/``) add their kernels for the same op; ``csrc/README.md``
says which file registers what.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mamlext.ops.reference import check_inputs, checked_reference_kernel

SCHEMA = "(Tensor[] params, Tensor[] grads, Tensor?[] lrs, float[] lr_scalars) -> Tensor[]"

# The schema is spelled out (torch < 2.6 cannot infer one from list[Tensor] annotations).
fused_sgd_op = torch.library.custom_op("mamlext::fused_sgd", mutates_args=(), schema=SCHEMA)(
    checked_reference_kernel
)


@fused_sgd_op.register_fake
def _(params, grads, lrs, lr_scalars):
    check_inputs(params, grads, lrs, lr_scalars)
    return [p.new_empty(p.shape) for p in params]


def _move_bdim(x: Optional[Tensor], bdim: Optional[int]) -> Optional[Tensor]:
    return x if x is None or bdim is None else x.movedim(bdim, 0)


@fused_sgd_op.register_vmap
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
