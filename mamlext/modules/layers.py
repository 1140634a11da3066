"""Meta versions of torch's parametric layers, each unbatched or task-batched.

Each class reuses its torch twin's constructor, attributes and documentation; only
``forward(input, params=None)`` is new. Shapes in a task-batched call (``T`` tasks):

=====================  =============================  ======================
layer                  input                          parameter
=====================  =============================  ======================
``MetaLinear``         ``[T, N, ..., in]``            ``weight [T, out, in]``
``MetaBilinear``       ``[T, N, ..., in1/in2]``       ``weight [T, out, in1, in2]``
``MetaConvNd``         ``[T, N, C, *spatial]``        ``weight [T, O, C/g, *k]``
``MetaEmbedding``      ``[T, ...]`` (indices)         ``weight [T, V, D]``
=====================  =============================  ======================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from mamlext.modules.module import MetaModule, Params, check_task_input, per_task, task_count


class MetaLinear(nn.Linear, MetaModule):
    __doc__ = nn.Linear.__doc__

    def forward(self, input: Tensor, params: Params | None = None) -> Tensor:
        weight, bias = self.meta_param(params, "weight"), self.meta_param(params, "bias")
        num_tasks = task_count()
        if num_tasks is None:
            return F.linear(input, weight, bias)
        check_task_input(input, num_tasks, self, min_dim=2)
        weight = per_task(weight, self.weight, num_tasks)
        x = input.reshape(num_tasks, -1, input.shape[-1])
        if bias is None:
            out = torch.bmm(x, weight.transpose(1, 2))
        else:
            bias = per_task(bias, self.bias, num_tasks)
            out = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
        return out.reshape(*input.shape[:-1], out.shape[-1])


class MetaBilinear(nn.Bilinear, MetaModule):
    __doc__ = nn.Bilinear.__doc__

    def forward(self, input1: Tensor, input2: Tensor, params: Params | None = None) -> Tensor:
        weight, bias = self.meta_param(params, "weight"), self.meta_param(params, "bias")
        num_tasks = task_count()
        if num_tasks is None:
            return F.bilinear(input1, input2, weight, bias)
        check_task_input(input1, num_tasks, self, min_dim=2)
        check_task_input(input2, num_tasks, self, min_dim=2)
        weight = per_task(weight, self.weight, num_tasks)
        x1 = input1.reshape(num_tasks, -1, input1.shape[-1])
        x2 = input2.reshape(num_tasks, -1, input2.shape[-1])
        out = torch.einsum("tni,toij,tnj->tno", x1, weight, x2)
        if bias is not None:
            out = out + per_task(bias, self.bias, num_tasks).unsqueeze(1)
        return out.reshape(*input1.shape[:-1], out.shape[-1])


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _MetaConvNd(MetaModule):
    """Shared forward of ``MetaConv1d/2d/3d`` (mixed into the torch classes)."""

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        conv = _CONV[len(self.kernel_size)]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def forward(self, input: Tensor, params: Params | None = None) -> Tensor:
        weight, bias = self.meta_param(params, "weight"), self.meta_param(params, "bias")
        num_tasks = task_count()
        if num_tasks is None:
            return self._conv(input, weight, bias, self.groups)
        spatial = len(self.kernel_size)
        check_task_input(input, num_tasks, self, min_dim=spatial + 3)
        weight = per_task(weight, self.weight, num_tasks)
        bias = None if bias is None else per_task(bias, self.bias, num_tasks)
        if self._use_matmul(input):
            return self._batched_matmul_conv(input, weight, bias)
        return self._grouped_conv(input, weight, bias)

    def _use_matmul(self, input: Tensor) -> bool:
        # On the CPU, the backward of a grouped convolution with few input channels per
        # group (the first layer of an image net) is very slow in oneDNN (~10x the
        # matmul form, benchmarks/RESULTS.md); with many channels the grouped form wins.
        fan_in = self.in_channels // self.groups * math.prod(self.kernel_size)
        return (
            input.device.type == "cpu"
            and len(self.kernel_size) == 2
            and self.groups == 1
            and not isinstance(self.padding, str)
            and fan_in <= 32
        )

    def _grouped_conv(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """All tasks in one grouped convolution: tasks become channel groups.

        ``[T, N, C, *S] -> [N, T*C, *S]`` is free when the input is N-major, as every
        output of this layer is.
        """
        num_tasks = input.shape[0]
        x = input.transpose(0, 1).flatten(1, 2)
        flat_bias = None if bias is None else bias.flatten()
        out = self._conv(x, weight.flatten(0, 1), flat_bias, num_tasks * self.groups)
        return out.unflatten(1, (num_tasks, -1)).transpose(0, 1)

    def _batched_matmul_conv(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The convolution as im2col + batched matmul: ``[T, N*L, C*k*k] @ [T, C*k*k, O]``."""
        num_tasks, n = input.shape[:2]
        x = input.flatten(0, 1)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        cols = F.unfold(x, self.kernel_size, self.dilation, padding, self.stride)  # [T*N, Ckk, L]
        h, w = (
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(
                x.shape[-2:], _pair(padding), self.dilation, self.kernel_size, self.stride
            )
        )
        cols = cols.unflatten(0, (num_tasks, n)).transpose(2, 3).flatten(1, 2)  # [T, N*L, Ckk]
        kernel = weight.flatten(2).transpose(1, 2)  # [T, Ckk, O]
        out = (
            torch.bmm(cols, kernel)
            if bias is None
            else torch.baddbmm(bias.unsqueeze(1), cols, kernel)
        )
        # [T, N*L, O] -> [T, N, O, H, W], N-major like the grouped path's output
        return out.unflatten(1, (n, h, w)).permute(1, 0, 4, 2, 3).contiguous().transpose(0, 1)


class MetaConv1d(nn.Conv1d, _MetaConvNd):
    __doc__ = nn.Conv1d.__doc__
    forward = _MetaConvNd.forward


class MetaConv2d(nn.Conv2d, _MetaConvNd):
    __doc__ = nn.Conv2d.__doc__
    forward = _MetaConvNd.forward


class MetaConv3d(nn.Conv3d, _MetaConvNd):
    __doc__ = nn.Conv3d.__doc__
    forward = _MetaConvNd.forward


class MetaEmbedding(nn.Embedding, MetaModule):
    __doc__ = nn.Embedding.__doc__

    def forward(self, input: Tensor, params: Params | None = None) -> Tensor:
        weight = self.meta_param(params, "weight")
        num_tasks = task_count()
        if num_tasks is None:
            return F.embedding(
                input, weight, self.padding_idx, self.max_norm, self.norm_type,
                self.scale_grad_by_freq, self.sparse,
            )  # fmt: skip
        if self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
            raise NotImplementedError(
                "MetaEmbedding: max_norm, scale_grad_by_freq and sparse are not supported in "
                "a task-batched call"
            )
        check_task_input(input, num_tasks, self, min_dim=1)
        weight = per_task(weight, self.weight, num_tasks)
        if self.padding_idx is not None:
            # As F.embedding: the padding row gets no gradient.
            is_padding = torch.zeros(weight.shape[1], 1, dtype=torch.bool, device=weight.device)
            is_padding[self.padding_idx] = True
            weight = torch.where(is_padding, weight.detach(), weight)
        tasks = torch.arange(num_tasks, device=input.device).view(-1, *[1] * (input.dim() - 1))
        return weight[tasks, input]
