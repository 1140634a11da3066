"""A meta-batch's inputs: one tensor ``[T, N, ...]``, or several, given to the model as
positional arguments (a tuple or list) or keyword arguments (a dict), e.g. token ids and an
attention mask. Every tensor has the tasks first and the samples second; other values
(flags, sizes) are passed to every call as they are."""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import Tensor

Inputs = Union[Tensor, tuple, list, dict]


def tensors(x: Inputs) -> list[Tensor]:
    """The tensors of ``x``, in order."""
    if isinstance(x, Tensor):
        return [x]
    values = x.values() if isinstance(x, dict) else x
    return [v for v in values if isinstance(v, Tensor)]


def take(x: Inputs, index: Any) -> Inputs:
    """``x`` with every tensor indexed by ``index`` (a task, or a slice of tasks)."""
    if isinstance(x, Tensor):
        return x[index]
    if isinstance(x, dict):
        return {k: v[index] if isinstance(v, Tensor) else v for k, v in x.items()}
    return type(x)(v[index] if isinstance(v, Tensor) else v for v in x)


def as_arguments(x: Inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the model call for ``x``."""
    if isinstance(x, Tensor):
        return (x,), {}
    if isinstance(x, dict):
        return (), dict(x)
    return tuple(x), {}


def num_samples(x: Inputs) -> int:
    """Samples per task: dim 1 of the inputs' first tensor."""
    return tensors(x)[0].shape[1]


def concat_samples(first: Inputs, second: Inputs, dim: int) -> Inputs:
    """``first`` then ``second`` along the sample dimension ``dim`` of every tensor (other
    values are taken from ``second``): one forward of a task's support and query samples."""
    if isinstance(first, Tensor):
        return _cat(first, second, dim)
    if isinstance(first, dict):
        return {
            k: _cat(first[k], v, dim) if isinstance(v, Tensor) else v for k, v in second.items()
        }
    return type(second)(
        _cat(a, b, dim) if isinstance(b, Tensor) else b for a, b in zip(first, second)
    )


def _cat(first: Tensor, second: Tensor, dim: int) -> Tensor:
    if first.shape[:dim] != second.shape[:dim] or first.shape[dim + 1 :] != second.shape[dim + 1 :]:
        raise ValueError(
            "bn='support' runs each task's support and query samples through the model in one "
            "forward, so their inputs must match in every dimension but the samples: got "
            f"support {tuple(first.shape)} and query {tuple(second.shape)}"
        )
    return torch.cat([first, second], dim)
