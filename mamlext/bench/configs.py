"""The benchmark's episode shapes, the seeded Conv-4 every peer starts from, and its batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mamlext.data.tasks import Batch
from mamlext.models import PLAIN_LAYERS, Conv4Layers, conv4

SEED_MODEL, SEED_BATCH = 0, 1


@dataclass(frozen=True)
class Config:
    """A few-shot classification episode shape and the Conv-4 that learns it."""

    name: str
    ways: int
    shots: int
    query: int  # query examples per class
    tasks: int  # meta-batch size
    steps: int  # inner steps
    step_size: float
    filters: int = 64
    channels: int = 1
    size: int = 28
    about: str = ""

    def describe(self) -> str:
        return (
            f"{self.name}: {self.ways}-way {self.shots}-shot, {self.query} query/class, "
            f"{self.tasks} tasks, {self.steps} step(s) at {self.step_size}, Conv-4/"
            f"{self.filters} on {self.channels}x{self.size}x{self.size}"
            + (f" ({self.about})" if self.about else "")
        )


CONFIGS = {
    c.name: c
    for c in (
        Config("tiny", 5, 1, 1, 2, 1, 0.4, filters=8, about="for the tests"),
        Config("A", 5, 1, 1, 32, 1, 0.4, about="MAML paper, Omniglot"),
        Config("A5", 5, 1, 1, 32, 5, 0.4, about="A with 5 steps"),
        Config("B", 5, 1, 15, 16, 1, 0.4, about="torchmeta example"),
        Config("B5", 5, 1, 15, 16, 5, 0.4, about="B with 5 steps"),
        Config("C", 20, 1, 1, 16, 5, 0.1, about="MAML paper, Omniglot 20-way"),
        Config("mini", 5, 5, 15, 4, 5, 0.01, 32, 3, 84, about="miniImageNet-shaped"),
    )
}
FULL_CONFIGS = ("A", "A5", "B", "B5", "C", "mini")  # C already has 5 steps
QUICK_CONFIGS = ("A", "B", "C")
# float64 correctness too: cheap on A; on C (5 second-order steps) float32 roundoff is
# amplified to ~1e-2 between exact implementations, so only float64 tells them apart.
FLOAT64_CONFIGS = ("A", "C")


def model(cfg: Config, layers: Conv4Layers) -> nn.Module:
    """The config's Conv-4: 4 x [conv3x3 (padding 1), BatchNorm, ReLU, MaxPool2d(2)], Linear."""
    return conv4(cfg.ways, cfg.channels, cfg.filters, cfg.size, pool=True, layers=layers)


def seed_model(cfg: Config) -> nn.Module:
    """The plain ``nn`` Conv-4 whose weights every peer starts from."""
    torch.manual_seed(SEED_MODEL)
    return model(cfg, PLAIN_LAYERS)


def twin(cfg: Config, like: Tensor, layers: Conv4Layers) -> nn.Module:
    """The Conv-4 built from ``layers``, holding the seed model's weights, on ``like``'s
    device and dtype."""
    built = model(cfg, layers)
    missing, _ = built.load_state_dict(seed_model(cfg).state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"the seed model lacks {missing}")
    return built.to(like.device, like.dtype)


def make_batch(cfg: Config, device: torch.device, dtype: torch.dtype) -> Batch:
    """One random meta-batch, the same for every peer (drawn on the CPU, then moved).

    Returns:
        ``{"train": (xs, ys), "test": (xq, yq)}``: inputs ``[tasks, ways * per_class, C, H,
        W]``, labels ``[tasks, ways * per_class]`` in ``0..ways-1`` (``per_class``: shots
        for train, query for test).
    """
    g = torch.Generator().manual_seed(SEED_BATCH)
    image = (cfg.channels, cfg.size, cfg.size)

    def split(per_class: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(cfg.tasks, cfg.ways * per_class, *image, generator=g)
        y = torch.arange(cfg.ways).repeat(per_class).expand(cfg.tasks, -1).contiguous()
        return x.to(device, dtype), y.to(device)

    return {"train": split(cfg.shots), "test": split(cfg.query)}
