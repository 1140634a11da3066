"""``metafy``: a plain ``nn.Module`` as the equivalent ``MetaModule``, sharing its tensors."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from mamlext.modules.attention import MetaMultiheadAttention
from mamlext.modules.container import MetaModuleDict, MetaModuleList, MetaSequential
from mamlext.modules.layers import (
    MetaBilinear,
    MetaConv1d,
    MetaConv2d,
    MetaConv3d,
    MetaEmbedding,
    MetaLinear,
)
from mamlext.modules.module import MetaModule
from mamlext.modules.norm import (
    MetaBatchNorm1d,
    MetaBatchNorm2d,
    MetaBatchNorm3d,
    MetaGroupNorm,
    MetaLayerNorm,
)

META_EQUIVALENT: dict[type[nn.Module], type[MetaModule]] = {
    nn.Sequential: MetaSequential, nn.ModuleList: MetaModuleList, nn.ModuleDict: MetaModuleDict,
    nn.Linear: MetaLinear, nn.Bilinear: MetaBilinear, nn.Conv1d: MetaConv1d,
    nn.Conv2d: MetaConv2d, nn.Conv3d: MetaConv3d, nn.BatchNorm1d: MetaBatchNorm1d,
    nn.BatchNorm2d: MetaBatchNorm2d, nn.BatchNorm3d: MetaBatchNorm3d,
    nn.LayerNorm: MetaLayerNorm, nn.GroupNorm: MetaGroupNorm, nn.Embedding: MetaEmbedding,
    nn.MultiheadAttention: MetaMultiheadAttention,
}  # fmt: skip


def metafy(model: nn.Module) -> MetaModule:
    """The ``MetaModule`` equivalent of ``model``, holding the same Parameters and buffers.

    Each supported layer or container (the keys of ``META_EQUIVALENT``, or a subclass of
    one that keeps its ``forward``) becomes its Meta class; parameter-free modules (ReLU,
    pooling, Flatten, Dropout, ...) are kept as they are, and MetaModules are returned as
    they are. Names, structure, attributes, hooks and train/eval mode are preserved.

    The result shares ``model``'s Parameter and buffer objects (not copies): an optimizer
    built on ``model.parameters()`` trains it, and running statistics it updates are
    ``model``'s. ``model`` itself is left unchanged.

    Raises:
        TypeError: a module with parameters has no Meta equivalent (another torch layer,
            a custom ``forward``, a parametrization, an uninitialised lazy module), or
            ``model`` itself is neither supported nor a MetaModule.
    """
    meta = _convert(model, "", {})
    if not isinstance(meta, MetaModule):
        raise TypeError(
            f"metafy: the model itself ({type(model).__name__}) must be a supported layer or "
            f"container; supported: {_supported()}"
        )
    return meta


def _convert(module: nn.Module, path: str, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:  # a module used twice stays one module
        return memo[id(module)]
    if isinstance(module, MetaModule):
        return module
    cls = _meta_class(module)
    if cls is None:
        if next(module.parameters(), None) is None:
            return module
        raise TypeError(
            f"metafy: cannot convert {path or '<model>'!r} "
            f"({type(module).__module__}.{type(module).__qualname__}): it has parameters and "
            f"no Meta equivalent (a subclass of a supported type counts only if it keeps its "
            f"forward). Supported: {_supported()}; parameter-free modules are kept as they "
            f"are. Write it as a MetaModule with forward(input, params=None) instead."
        )
    # A new object of the Meta class over shallow copies of the module's state (its
    # parameter, buffer, child and hook dicts): the same tensors, its own module tree.
    meta = cls.__new__(cls)
    meta.__dict__.update(
        {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in vars(module).items()}
    )
    memo[id(module)] = meta
    for name, child in meta._modules.items():
        if child is not None:
            meta._modules[name] = _convert(child, f"{path}.{name}" if path else name, memo)
    return meta


def _meta_class(module: nn.Module) -> type[MetaModule] | None:
    if parametrize.is_parametrized(module) or isinstance(module, LazyModuleMixin):
        return None
    for base in type(module).__mro__:
        if base in META_EQUIVALENT:
            return META_EQUIVALENT[base] if type(module).forward is base.forward else None
    return None


def _supported() -> str:
    return ", ".join(f"nn.{cls.__name__}" for cls in META_EQUIVALENT)
