"""``MetaMultiheadAttention``: ``nn.MultiheadAttention`` with ``params=``, task-batched.

Unbatched it is ``nn.MultiheadAttention`` (through ``F.multi_head_attention_forward``).
Task-batched shapes (``T`` tasks, batch ``N``, ``H`` heads, target length ``L``, source
length ``S``), all tasks in one pass:

======================  ================================================================
``query``               ``[T, N, L, E]`` if ``batch_first`` else ``[T, L, N, E]``
``key``, ``value``      ``[T, N, S, kdim/vdim]`` (or ``[T, S, N, ...]``)
``key_padding_mask``    ``[T, N, S]``, bool (``True`` = ignore) or float (added)
``attn_mask``           ``[L, S]`` or ``[N*H, L, S]`` shared by all tasks, or
                        ``[T, N*H, L, S]``; bool or float
``attn_output``         shaped as ``query``
``attn_weights``        ``[T, N, L, S]``, or ``[T, N, H, L, S]`` if not averaged
======================  ================================================================

The task-batched path computes attention with an explicit softmax, never
``F.scaled_dot_product_attention``: the fused CUDA kernels of the latter have no double
backward, which second-order MAML needs. ``is_causal`` is only a hint there: the given
``attn_mask`` is applied. Per-task unbatched inputs (``[T, L, E]``) are not supported.
Pass ``params`` by keyword (``MetaModule`` detects task batching from ``params=``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamlext.modules.layers import MetaLinear
from mamlext.modules.module import MetaModule, Params, check_task_input, per_task, task_count

_OWN = (
    "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
    "bias_k", "bias_v",
)  # fmt: skip


class MetaMultiheadAttention(nn.MultiheadAttention, MetaModule):
    __doc__ = nn.MultiheadAttention.__doc__

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # out_proj becomes a MetaLinear holding the same Parameters, so that
        # meta_named_parameters() lists out_proj.weight/bias and params must supply them.
        old = self.out_proj
        self.out_proj = MetaLinear(
            old.in_features, old.out_features, bias=old.bias is not None, device="meta"
        )
        self.out_proj.weight, self.out_proj.bias = old.weight, old.bias

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        params: Params | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        num_tasks = task_count()
        if params is None and num_tasks is None:
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal,
            )  # fmt: skip
        p = {name: self.meta_param(params, name) for name in _OWN}
        out_params = self.get_subdict(params, "out_proj")
        if num_tasks is None:
            return self._unbatched(
                query, key, value, p, out_params, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal,
            )  # fmt: skip
        return self._batched(
            query, key, value, p, out_params, key_padding_mask, need_weights, attn_mask,
            average_attn_weights, is_causal, num_tasks,
        )  # fmt: skip

    def _unbatched(
        self, query, key, value, p, out_params, key_padding_mask, need_weights, attn_mask,
        average_attn_weights, is_causal,
    ):  # fmt: skip
        """``nn.MultiheadAttention``'s own (non-fast-path) computation with ``p``'s tensors."""
        transpose = self.batch_first and query.dim() == 3
        if transpose:
            # One transpose per distinct tensor keeps `query is key is value` true (torch
            # then projects self-attention in one matmul).
            t = {id(x): x.transpose(0, 1) for x in (query, key, value)}
            query, key, value = t[id(query)], t[id(key)], t[id(value)]
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads,
            p["in_proj_weight"], p["in_proj_bias"], p["bias_k"], p["bias_v"],
            self.add_zero_attn, self.dropout,
            self.out_proj.meta_param(out_params, "weight"),
            self.out_proj.meta_param(out_params, "bias"),
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=p["q_proj_weight"],
            k_proj_weight=p["k_proj_weight"],
            v_proj_weight=p["v_proj_weight"],
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )  # fmt: skip
        return (out.transpose(0, 1) if transpose else out), weights

    def _batched(
        self, query, key, value, p, out_params, key_padding_mask, need_weights, attn_mask,
        average_attn_weights, is_causal, num_tasks,
    ):  # fmt: skip
        for x in (query, key, value):
            check_task_input(x, num_tasks, self, min_dim=4)
        if not self.batch_first:
            query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        if is_causal and attn_mask is None:
            raise RuntimeError("MetaMultiheadAttention: is_causal needs attn_mask (as torch)")
        T, N, L, E = query.shape
        S, H, D = key.shape[2], self.num_heads, self.head_dim

        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = per_task(p["in_proj_weight"], self.in_proj_weight, T).chunk(3, dim=1)
        else:
            w_q, w_k, w_v = (
                per_task(p[name], getattr(self, name), T)
                for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
            )
        b_q = b_k = b_v = None
        if p["in_proj_bias"] is not None:
            b_q, b_k, b_v = per_task(p["in_proj_bias"], self.in_proj_bias, T).chunk(3, dim=1)
        q, k, v = _project(query, w_q, b_q), _project(key, w_k, b_k), _project(value, w_v, b_v)

        mask = _merge_masks(attn_mask, key_padding_mask, T, N, H, L, S, q.dtype)
        if p["bias_k"] is not None:
            bias_k = per_task(p["bias_k"], self.bias_k, T).expand(T, N, 1, E)
            bias_v = per_task(p["bias_v"], self.bias_v, T).expand(T, N, 1, E)
            k, v = torch.cat([k, bias_k], dim=2), torch.cat([v, bias_v], dim=2)
            mask = None if mask is None else F.pad(mask, (0, 1))
        # [T, N, len, E] -> [T, N, H, len, D]
        q, k, v = (x.unflatten(-1, (H, D)).transpose(2, 3) for x in (q, k, v))
        if self.add_zero_attn:
            zeros = k.new_zeros(T, N, H, 1, D)
            k, v = torch.cat([k, zeros], dim=3), torch.cat([v, zeros], dim=3)
            mask = None if mask is None else F.pad(mask, (0, 1))

        scores = (q * D**-0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = (weights @ v).transpose(2, 3).reshape(T, N * L, E)
        out = self.out_proj(out, params=out_params).view(T, N, L, E)
        if not self.batch_first:
            out = out.transpose(1, 2)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=2) if average_attn_weights else weights


def _project(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x [T, N, L, in] @ weight[t].T + bias[t] -> [T, N, L, out]`` in one batched matmul."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    wt = weight.transpose(1, 2)
    out = torch.bmm(flat, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), flat, wt)
    return out.view(*x.shape[:-1], -1)


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (``True`` = ignore) as an additive ``0 / -inf`` mask, as torch does."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"MetaMultiheadAttention: masks must be bool or float, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _merge_masks(attn_mask, key_padding_mask, T, N, H, L, S, dtype) -> Tensor | None:
    """One additive mask that broadcasts against scores ``[T, N, H, L, S]``, or ``None``."""
    mask = None
    if attn_mask is not None:
        shapes = {2: (L, S), 3: (N * H, L, S), 4: (T, N * H, L, S)}
        if tuple(attn_mask.shape) != shapes.get(attn_mask.dim()):
            raise ValueError(
                f"MetaMultiheadAttention: task-batched attn_mask must be [L, S], [N*H, L, S] or "
                f"[T, N*H, L, S] with T={T}, N={N}, H={H}, L={L}, S={S}; "
                f"got {tuple(attn_mask.shape)}"
            )
        mask = _float_mask(attn_mask, dtype)
        if mask.dim() > 2:
            mask = mask.unflatten(-3, (N, H))
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (T, N, S):
            raise ValueError(
                f"MetaMultiheadAttention: task-batched key_padding_mask must be [T, N, S] = "
                f"{(T, N, S)}, got {tuple(key_padding_mask.shape)}"
            )
        padding = _float_mask(key_padding_mask, dtype).view(T, N, 1, 1, S)
        mask = padding if mask is None else mask + padding
    return mask
