"""``learn2learn.vision.models`` and ``learn2learn.nn``: the networks of learn2learn's
examples, with the same layers, parameter names and order, and initialisation schemes.

Written from learn2learn 0.2.0's documented behaviour. The truncated normal of ``fc_init_``
is drawn from torch's generator here (learn2learn draws it with scipy from numpy's), so
the same seed gives other initial weights than learn2learn's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "CNN4", "CNN4Backbone", "ConvBase", "ConvBlock", "Flatten", "Lambda", "LinearBlock",
    "MiniImagenetCNN", "OmniglotCNN", "OmniglotFC", "Scale", "fc_init_", "freeze",
    "maml_init_", "unfreeze",
]  # fmt: skip


class Lambda(nn.Module):
    """A module that calls ``fn``."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class Flatten(nn.Module):
    """``[N, ...] -> [N, -1]``."""

    def forward(self, x):
        return x.view(x.size(0), -1)


class Scale(nn.Module):
    """Multiplication by a learned scalar (initially ``alpha``)."""

    def __init__(self, shape=1, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(shape) * alpha)

    def forward(self, x):
        return x * self.alpha


def freeze(module: nn.Module) -> nn.Module:
    """``requires_grad=False`` for every parameter; returns ``module``."""
    return module.requires_grad_(False)


def unfreeze(module: nn.Module) -> nn.Module:
    return module.requires_grad_(True)


def fc_init_(module: nn.Module) -> nn.Module:
    """Weight from a normal of std 0.01 truncated at two stds, bias 0."""
    nn.init.trunc_normal_(module.weight.data, std=0.01, a=-0.02, b=0.02)
    nn.init.zeros_(module.bias.data)
    return module


def maml_init_(module: nn.Module) -> nn.Module:
    """Xavier-uniform weight (gain 1), bias 0."""
    nn.init.xavier_uniform_(module.weight.data, gain=1.0)
    nn.init.zeros_(module.bias.data)
    return module


class LinearBlock(nn.Module):
    """Linear, BatchNorm without running statistics (eps 1e-3), ReLU."""

    def __init__(self, input_size: int, output_size: int) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.normalize = nn.BatchNorm1d(
            output_size, affine=True, momentum=0.999, eps=1e-3, track_running_stats=False
        )
        self.linear = fc_init_(nn.Linear(input_size, output_size))

    def forward(self, x):
        return self.relu(self.normalize(self.linear(x)))


class ConvBlock(nn.Module):
    """3x3 convolution (Xavier), BatchNorm (weight U[0, 1)), ReLU, then max-pooling; without
    ``max_pool`` the convolution strides instead."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, max_pool: bool = True,
        max_pool_factor: float = 1.0,
    ) -> None:  # fmt: skip
        super().__init__()
        stride = (int(2 * max_pool_factor), int(2 * max_pool_factor))
        if max_pool:
            self.max_pool = nn.MaxPool2d(kernel_size=stride, stride=stride, ceil_mode=False)
            stride = (1, 1)
        else:
            self.max_pool = nn.Identity()
        self.normalize = nn.BatchNorm2d(out_channels, affine=True)
        nn.init.uniform_(self.normalize.weight)
        self.relu = nn.ReLU()
        self.conv = maml_init_(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=1, bias=True)
        )

    def forward(self, x):
        return self.max_pool(self.relu(self.normalize(self.conv(x))))


class ConvBase(nn.Sequential):
    """``layers`` ConvBlocks of ``hidden`` channels (keys ``0..layers-1``)."""

    def __init__(
        self, hidden: int = 64, channels: int = 1, max_pool: bool = False, layers: int = 4,
        max_pool_factor: float = 1.0,
    ) -> None:  # fmt: skip
        blocks = [
            ConvBlock(channels if i == 0 else hidden, hidden, (3, 3), max_pool, max_pool_factor)
            for i in range(layers)
        ]
        super().__init__(*blocks)


class OmniglotFC(nn.Module):
    """Fully connected Omniglot network: flatten, LinearBlocks of ``sizes``, a linear head."""

    def __init__(self, input_size: int, output_size: int, sizes=None) -> None:
        super().__init__()
        sizes = [256, 128, 64, 64] if sizes is None else list(sizes)
        widths = [input_size, *sizes]
        blocks = [LinearBlock(a, b) for a, b in zip(widths[:-1], widths[1:])]
        self.features = nn.Sequential(Flatten(), nn.Sequential(*blocks))
        self.classifier = fc_init_(nn.Linear(sizes[-1], output_size))
        self.input_size = input_size

    def forward(self, x):
        return self.classifier(self.features(x))


class OmniglotCNN(nn.Module):
    """The MAML paper's Omniglot Conv-4 (strided, no pooling), averaged spatially, a linear
    head with N(0, 1) weights and zero bias. ``base`` is also ``features[1]``."""

    def __init__(self, output_size: int = 5, hidden_size: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.base = ConvBase(hidden=hidden_size, channels=1, max_pool=False, layers=layers)
        self.features = nn.Sequential(
            Lambda(lambda x: x.view(-1, 1, 28, 28)),
            self.base,
            Lambda(lambda x: x.mean(dim=[2, 3])),
            Flatten(),
        )
        self.classifier = nn.Linear(hidden_size, output_size, bias=True)
        self.classifier.weight.data.normal_()
        self.classifier.bias.data.mul_(0.0)

    def forward(self, x):
        return self.classifier(self.features(x))


class CNN4Backbone(ConvBase):
    """ConvBase with max-pooling (factor ``4 // layers``), flattened."""

    def __init__(
        self, hidden_size: int = 64, layers: int = 4, channels: int = 3, max_pool: bool = True,
        max_pool_factor: float | None = None,
    ) -> None:  # fmt: skip
        factor = 4 // layers if max_pool_factor is None else max_pool_factor
        super().__init__(hidden_size, channels, max_pool, layers, factor)

    def forward(self, x):
        return super().forward(x).reshape(x.size(0), -1)


class CNN4(nn.Module):
    """The MAML paper's mini-ImageNet Conv-4 (84x84 inputs: 25 * hidden features)."""

    def __init__(
        self, output_size: int, hidden_size: int = 64, layers: int = 4, channels: int = 3,
        max_pool: bool = True, embedding_size: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        embedding_size = 25 * hidden_size if embedding_size is None else embedding_size
        self.features = CNN4Backbone(hidden_size, layers, channels, max_pool, 4 // layers)
        self.classifier = maml_init_(nn.Linear(embedding_size, output_size, bias=True))
        self.hidden_size = hidden_size

    def forward(self, x):
        return self.classifier(self.features(x))


MiniImagenetCNN = CNN4
