"""The networks of the MAML paper (Finn et al., 2017), as task-batchable MetaModules."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from mamlext.modules import MetaBatchNorm2d, MetaConv2d, MetaLinear, MetaSequential


class Conv4Layers(NamedTuple):
    """The layer factories a Conv-4 is built from (classes such as ``nn.Conv2d`` fit)."""

    conv: Callable[..., nn.Module]  # conv(in_channels, out_channels, 3, stride=, padding=1)
    norm: Callable[[int], nn.Module]  # norm(channels)
    linear: Callable[[int, int], nn.Module]  # linear(in_features, out_features)
    sequential: Callable[..., nn.Module]  # sequential(*modules)


META_LAYERS = Conv4Layers(MetaConv2d, MetaBatchNorm2d, MetaLinear, MetaSequential)
PLAIN_LAYERS = Conv4Layers(nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.Sequential)


def conv4(
    ways: int,
    in_channels: int = 1,
    hidden: int = 64,
    image_size: int = 28,
    pool: bool = False,
    layers: Conv4Layers = META_LAYERS,
) -> nn.Module:
    """Four blocks of 3x3 conv (``hidden`` filters), BatchNorm, ReLU, then a linear head.

    ``pool=False`` downsamples with stride-2 convolutions, as the paper does for Omniglot;
    ``pool=True`` uses 2x2 max-pooling (its miniImageNet network). Input ``[N, C, H, W]``.

    Args:
        layers: what the conv, norm, linear and sequential modules are made of; the default,
            mamlext's Meta layers, gives a task-batchable ``MetaSequential``.
            ``PLAIN_LAYERS`` gives its plain ``nn`` twin (same state_dict keys).
    """
    blocks: list[nn.Module] = []
    size, channels = image_size, in_channels
    for _ in range(4):
        if pool:
            blocks += [layers.conv(channels, hidden, 3, padding=1), layers.norm(hidden)]
            blocks += [nn.ReLU(), nn.MaxPool2d(2)]
            size //= 2
        else:
            blocks += [layers.conv(channels, hidden, 3, stride=2, padding=1)]
            blocks += [layers.norm(hidden), nn.ReLU()]
            size = (size + 1) // 2
        channels = hidden
    return layers.sequential(*blocks, nn.Flatten(), layers.linear(hidden * size * size, ways))


def mlp(sizes: tuple[int, ...] = (1, 40, 40, 1)) -> MetaSequential:
    """Fully connected ReLU network (the paper's sinusoid regressor: 1-40-40-1)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(MetaLinear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return MetaSequential(*layers)
