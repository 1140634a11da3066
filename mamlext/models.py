"""The networks of the MAML paper (Finn et al., 2017), as task-batchable MetaModules."""

from __future__ import annotations

from torch import nn

from mamlext.modules import MetaBatchNorm2d, MetaConv2d, MetaLinear, MetaSequential


def conv4(
    ways: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28, pool: bool = False
) -> MetaSequential:
    """Four blocks of 3x3 conv (``hidden`` filters), BatchNorm, ReLU, then a linear head.

    ``pool=False`` downsamples with stride-2 convolutions, as the paper does for Omniglot;
    ``pool=True`` uses 2x2 max-pooling (its miniImageNet network). Input ``[N, C, H, W]``.
    """
    layers: list[nn.Module] = []
    size, channels = image_size, in_channels
    for _ in range(4):
        if pool:
            layers += [MetaConv2d(channels, hidden, 3, padding=1), MetaBatchNorm2d(hidden)]
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            size //= 2
        else:
            layers += [MetaConv2d(channels, hidden, 3, stride=2, padding=1)]
            layers += [MetaBatchNorm2d(hidden), nn.ReLU()]
            size = (size + 1) // 2
        channels = hidden
    return MetaSequential(*layers, nn.Flatten(), MetaLinear(hidden * size * size, ways))


def mlp(sizes: tuple[int, ...] = (1, 40, 40, 1)) -> MetaSequential:
    """Fully connected ReLU network (the paper's sinusoid regressor: 1-40-40-1)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(MetaLinear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return MetaSequential(*layers)
