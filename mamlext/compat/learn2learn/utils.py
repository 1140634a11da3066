"""``learn2learn.utils``: differentiable copies of modules and updates of their parameters.

Written from learn2learn 0.2.0's documented and tested behaviour:

- :func:`clone_module` copies a module's structure and clones its parameters with
  ``Tensor.clone()`` (differentiable: losses on the copy reach the original's ``.grad``).
  Buffers are shared with the original unless they require grad, so a copy in training
  mode updates the original's BatchNorm running statistics, as learn2learn's copies do. A
  tensor reached through two submodules is cloned once.
- :func:`update_module` replaces each parameter ``p`` that carries an ``update`` attribute
  by ``p + p.update`` (a new tensor: the graph through the old one is kept).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "accuracy", "clone_module", "clone_named_parameters", "clone_parameters", "detach_module",
    "magic_box", "swap_parameters", "update_module", "warn_once",
]  # fmt: skip


def magic_box(x):
    """``exp(x - x.detach())``: value 1, gradient that of ``x`` (DiCE); non-tensors as they are."""
    if isinstance(x, Tensor):
        return torch.exp(x - x.detach())
    return x


def clone_parameters(param_list: Iterable[Tensor]) -> list[Tensor]:
    return [p.clone() for p in param_list]


def clone_named_parameters(param_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: p.clone() for name, p in param_dict.items()}


def clone_module(module, memo: dict | None = None):
    """A differentiable copy of ``module``: the same classes and attributes, cloned parameters
    (non-leaf tensors), shared buffers (cloned only if they require grad), copied submodules.
    Anything that is not a module is returned as it is."""
    if not isinstance(module, nn.Module):
        return module
    memo = {} if memo is None else memo  # id(original tensor) -> its clone
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = clone._parameters.copy()
    clone._buffers = clone._buffers.copy()
    clone._modules = clone._modules.copy()
    for key, param in module._parameters.items():
        if param is not None:
            clone._parameters[key] = _cloned(param, memo)
    for key, buffer in module._buffers.items():
        if buffer is not None and buffer.requires_grad:
            clone._buffers[key] = _cloned(buffer, memo)
    for key, child in module._modules.items():
        clone._modules[key] = clone_module(child, memo)
    return _refresh_recurrent(clone)


def _cloned(tensor: Tensor, memo: dict) -> Tensor:
    if id(tensor) not in memo:
        memo[id(tensor)] = (tensor, tensor.clone())  # the original kept alive: ids stay unique
    return memo[id(tensor)][1]


def _refresh_recurrent(module: nn.Module) -> nn.Module:
    """An RNN keeps a flat list of its weights: rebuild it from the new parameters."""
    if hasattr(module, "flatten_parameters"):
        module = module._apply(lambda x: x)
    return module


def update_module(module, updates: Sequence[Tensor] | None = None, memo: dict | None = None):
    """Replace, in place, each parameter (and buffer) ``p`` with an ``update`` attribute by
    ``p + p.update``; ``updates``, one per ``module.parameters()``, are set first. Returns
    ``module``."""
    if updates is not None:
        params = list(module.parameters())
        if len(updates) != len(params):
            warnings.warn(
                f"update_module(): parameters and updates have different lengths "
                f"({len(params)} vs {len(updates)})",
                stacklevel=2,
            )
        for p, update in zip(params, updates):
            p.update = update
    memo = {} if memo is None else memo
    for tensors in (module._parameters, module._buffers):
        for key, value in tensors.items():
            if value is None:
                continue
            if id(value) in memo:
                tensors[key] = memo[id(value)][1]
            elif getattr(value, "update", None) is not None:
                updated = value + value.update
                value.update = None
                memo[id(value)] = (value, updated)
                tensors[key] = updated
    for child in module._modules.values():
        if child is not None:
            update_module(child, memo=memo)
    return _refresh_recurrent(module)


def swap_parameters(module: nn.Module, replacements: dict[int, Tensor]) -> nn.Module:
    """Replace, in place, every parameter ``p`` of ``module`` and its submodules with
    ``replacements[id(p)]`` where there is one (each copy of a shared submodule included)."""
    for submodule in module.modules():
        changed = False
        for key, value in submodule._parameters.items():
            if value is not None and id(value) in replacements:
                submodule._parameters[key] = replacements[id(value)]
                changed = True
        if changed:
            _refresh_recurrent(submodule)
    return module


def detach_module(module, keep_requires_grad: bool = False) -> None:
    """Detach, in place, every parameter (and every buffer that requires grad) from its graph;
    ``keep_requires_grad``: those that required grad still do."""
    if not isinstance(module, nn.Module):
        return
    for tensors, only_grad in ((module._parameters, False), (module._buffers, True)):
        for value in tensors.values():
            if value is None or (only_grad and not value.requires_grad):
                continue
            required = value.requires_grad
            value.detach_()
            if keep_requires_grad and required:
                value.requires_grad_()
    for child in module._modules.values():
        detach_module(child, keep_requires_grad)


def accuracy(predictions: Tensor, targets: Tensor) -> Tensor:
    """The share of rows of ``predictions`` whose argmax is the target (a 0-dim tensor)."""
    return (predictions.argmax(dim=1).long() == targets.long()).sum().float() / predictions.size(0)


_WARNED: set[str] = set()


def warn_once(message: str, severity: str = "default") -> None:
    """Warn once per message: ``"default"`` a UserWarning, ``"deprecation"`` a
    DeprecationWarning, ``"error"`` a RuntimeError."""
    if message in _WARNED:
        return
    _WARNED.add(message)
    if severity == "error":
        raise RuntimeError(message)
    category = DeprecationWarning if severity == "deprecation" else UserWarning
    warnings.warn(message, category, stacklevel=3)
