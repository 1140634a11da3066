"""The objects of a run, built from its :class:`~mamlext.train.config.TrainConfig`: the
task samplers and the MAML of the paper's network for the data."""

from __future__ import annotations

import torch.nn.functional as F

from mamlext.maml import MAML
from mamlext.models import conv4, mlp
from mamlext.train.config import TrainConfig, first_order_at


def build_sampler(config: TrainConfig, split: str, seed: int, rank: int = 0):
    """The task sampler of ``split`` ("train" or "test")."""
    from mamlext.data.toy import Harmonic, Sinusoid

    if config.dataset == "sinusoid":
        return Sinusoid(config.shots, config.query, seed=seed, rank=rank)
    if config.dataset == "harmonic":
        return Harmonic(config.shots, config.query, seed=seed, rank=rank)
    from mamlext.data.omniglot import omniglot_tasks

    return omniglot_tasks(
        config.data_root, split, config.ways, config.shots, config.query,
        split_scheme=config.split_scheme, seed=seed, rank=rank, download=config.download,
    )  # fmt: skip


def build_maml(config: TrainConfig) -> MAML:
    """The paper's network for the data (1-40-40-1 MLP or Conv-4) in the config's MAML variant."""
    model = mlp() if config.regression else conv4(config.ways)
    modes = {"metasgd": "per_element", "mamlpp": "per_layer_per_step"}
    head = [name for name, _ in model.meta_named_parameters()][-2:]
    return MAML(
        model,
        step_size=config.step_size,
        num_steps=config.inner_steps,
        num_test_steps=config.test_steps,
        first_order=first_order_at(config, 0),
        loss_fn=F.mse_loss if config.regression else F.cross_entropy,
        step_size_mode=modes.get(config.algorithm, "fixed"),
        adapt_params=head if config.algorithm == "anil" else None,
        bn=config.bn,
        bn_per_step_weights=config.bn_per_step_weights,
        inner_checkpoint=config.inner_checkpoint,
    )
