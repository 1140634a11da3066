"""The objects of a run, built from its :class:`~mamlext.train.config.TrainConfig`: the
task samplers and the MAML of the paper's network for the data."""

from __future__ import annotations

import importlib

import torch.nn.functional as F
from torch import nn

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


def build_model(config: TrainConfig) -> nn.Module:
    """The config's network: the paper's for the data (1-40-40-1 MLP or Conv-4, Meta layers)
    or ``config.model``, ``"package.module:factory"``, called with ``ways=`` for
    classification and nothing for regression (any ``nn.Module``)."""
    if config.model is None:
        return mlp() if config.regression else conv4(config.ways)
    module_name, _, attribute = config.model.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"--model {config.model!r}: cannot import it ({type(error).__name__}: {error}); give "
            "package.module:factory, a callable returning an nn.Module"
        ) from None
    model = factory() if config.regression else factory(ways=config.ways)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"--model {config.model!r} returned a {type(model).__name__}, not an nn.Module"
        )
    return model


def build_maml(config: TrainConfig) -> MAML:
    """The config's network (:func:`build_model`) in the config's MAML variant."""
    model = build_model(config)
    modes = {"metasgd": "per_element", "mamlpp": "per_layer_per_step"}
    head = [name for name, _ in model.named_parameters()][-2:]
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
        bn_query_row=config.bn_query_row,
        inner_checkpoint=config.inner_checkpoint,
    )
