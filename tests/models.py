"""Small twin models for the tests: a plain torch model and its Meta copy (same weights)."""

from __future__ import annotations

import torch
from torch import nn

from mamlext import modules as mm

F64 = torch.float64


def _conv_block(conv, norm, channels_in, channels_out, dims=2):
    pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d}[dims]
    return conv(channels_in, channels_out, 3, padding=1), norm(channels_out), nn.ReLU(), pool(2)


def conv_bn(meta: bool, channels: int = 4, ways: int = 3):
    """Two conv/BN/ReLU/pool blocks on [1, 8, 8] images, then a linear head."""
    conv, bn, seq, lin = (
        (mm.MetaConv2d, mm.MetaBatchNorm2d, mm.MetaSequential, mm.MetaLinear)
        if meta
        else (nn.Conv2d, nn.BatchNorm2d, nn.Sequential, nn.Linear)
    )
    return seq(
        *_conv_block(conv, bn, 1, channels),
        *_conv_block(conv, bn, channels, channels),
        nn.Flatten(),
        lin(channels * 2 * 2, ways),
    )


def conv_groupnorm(meta: bool, channels: int = 4, ways: int = 3):
    conv, seq, lin = (
        (mm.MetaConv2d, mm.MetaSequential, mm.MetaLinear)
        if meta
        else (nn.Conv2d, nn.Sequential, nn.Linear)
    )
    norm = (lambda c: mm.MetaGroupNorm(2, c)) if meta else (lambda c: nn.GroupNorm(2, c))
    return seq(*_conv_block(conv, norm, 1, channels), nn.Flatten(), lin(channels * 4 * 4, ways))


def conv1d_bn(meta: bool, channels: int = 4, ways: int = 3):
    conv, bn, seq, lin = (
        (mm.MetaConv1d, mm.MetaBatchNorm1d, mm.MetaSequential, mm.MetaLinear)
        if meta
        else (nn.Conv1d, nn.BatchNorm1d, nn.Sequential, nn.Linear)
    )
    return seq(*_conv_block(conv, bn, 1, channels, dims=1), nn.Flatten(), lin(channels * 4, ways))


def mlp_layernorm(meta: bool, ways: int = 3):
    seq, lin, ln = (
        (mm.MetaSequential, mm.MetaLinear, mm.MetaLayerNorm)
        if meta
        else (nn.Sequential, nn.Linear, nn.LayerNorm)
    )
    return seq(lin(6, 10), ln(10), nn.Tanh(), lin(10, ways))


def embedding_mlp(meta: bool, ways: int = 3):
    seq, lin, emb = (
        (mm.MetaSequential, mm.MetaLinear, mm.MetaEmbedding)
        if meta
        else (nn.Sequential, nn.Linear, nn.Embedding)
    )
    return seq(emb(11, 4, padding_idx=0), nn.Flatten(), nn.Tanh(), lin(4 * 5, ways))


MODELS = {
    "conv-batchnorm2d": (conv_bn, lambda *s: torch.randn(*s, 1, 8, 8, dtype=F64)),
    "conv-groupnorm": (conv_groupnorm, lambda *s: torch.randn(*s, 1, 8, 8, dtype=F64)),
    "conv1d-batchnorm1d": (conv1d_bn, lambda *s: torch.randn(*s, 1, 8, dtype=F64)),
    "mlp-layernorm": (mlp_layernorm, lambda *s: torch.randn(*s, 6, dtype=F64)),
    "embedding": (embedding_mlp, lambda *s: torch.randint(0, 11, (*s, 5))),
}


def twins(name: str, seed: int = 0):
    """(plain torch model, Meta model with the same weights, input maker), float64."""
    build, make_input = MODELS[name]
    torch.manual_seed(seed)
    plain = build(meta=False).to(F64)
    meta = build(meta=True).to(F64)
    meta.load_state_dict(plain.state_dict())
    return plain, meta, make_input


class PlainRegressor(nn.Module):
    """The paper's 1-40-40-1 sinusoid network as an ordinary module with its own forward."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(1, 40)
        self.more = nn.Linear(40, 40)
        self.out = nn.Linear(40, 1)

    def forward(self, x):
        return self.out(torch.relu(self.more(torch.relu(self.hidden(x)))))


class PlainConv(nn.Module):
    """A small Omniglot classifier with its own forward (torch's layers, BatchNorm)."""

    def __init__(self, ways: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16 * 7 * 7, ways)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.view(x.size(0), -1))


def plain_regressor():
    return PlainRegressor()


def plain_conv(ways: int):
    return PlainConv(ways)
