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
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> nn.Module:
    """Four blocks of 3x3 conv (``hidden`` filters), BatchNorm, ReLU, then a linear head.

    ``pool=False`` downsamples with stride-2 convolutions, as the paper does for Omniglot;
    ``pool=True`` uses 2x2 max-pooling (its miniImageNet network). Input ``[N, C, H, W]``.

    Args:
        layers: what the conv, norm, linear and sequential modules are made of; the default,
            mamlext's Meta layers, gives a task-batchable ``MetaSequential``.
            ``PLAIN_LAYERS`` gives its plain ``nn`` twin (same state_dict keys).
        activation: the nonlinearity's module class (``nn.ReLU``).
    """
    blocks: list[nn.Module] = []
    size, channels = image_size, in_channels
    for _ in range(4):
        if pool:
            blocks += [layers.conv(channels, hidden, 3, padding=1), layers.norm(hidden)]
            blocks += [activation(), nn.MaxPool2d(2)]
            size //= 2
        else:
            blocks += [layers.conv(channels, hidden, 3, stride=2, padding=1)]
            blocks += [layers.norm(hidden), activation()]
            size = (size + 1) // 2
        channels = hidden
    return layers.sequential(*blocks, nn.Flatten(), layers.linear(hidden * size * size, ways))


def mamlpp_conv4(
    ways: int,
    in_channels: int = 1,
    hidden: int = 64,
    image_size: int = 28,
    layers: Conv4Layers = META_LAYERS,
) -> nn.Module:
    """MAML++'s Omniglot network, as its authors' code builds it (Antoniou et al. 2019;
    AntreasAntoniou/HowToTrainYourMAMLPytorch, ``VGGReLUNormNetwork``).

    Four blocks of 3x3 conv of stride 1 with a bias, BatchNorm, LeakyReLU (slope 0.01) and
    2x2 max-pooling (28 -> 14 -> 7 -> 3 -> 1), then a linear head; conv and linear weights
    Xavier-uniform, biases zero. :func:`conv4` with ``pool=True`` and another activation
    and initialisation. Input ``[N, C, H, W]``.
    """
    model = conv4(ways, in_channels, hidden, image_size, True, layers, nn.LeakyReLU)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def mlp(sizes: tuple[int, ...] = (1, 40, 40, 1)) -> MetaSequential:
    """Fully connected ReLU network (the paper's sinusoid regressor: 1-40-40-1)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(MetaLinear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return MetaSequential(*layers)
