"""What a run of ``mamlext train`` depends on: :class:`TrainConfig`, its presets (the MAML
paper's settings for each data set, MAML++'s recipe) and the schedules read from it."""

from __future__ import annotations

import dataclasses
from typing import Any

from mamlext.maml.recompute import check_setting
from mamlext.modules.norm import QUERY_ROWS
from mamlext.schedules import cosine, multi_step_weights

DATASETS = ("sinusoid", "harmonic", "omniglot")
ALGORITHMS = ("maml", "fomaml", "metasgd", "mamlpp", "anil")
META_LR_SCHEDULES = ("milestones", "cosine")
MAMLPP_MULTI_STEP_LOSS = 5000  # the paper's 10 epochs of 500 iterations (capped at the run)
# MAML++'s authors' Omniglot runs (HowToTrainYourMAMLPytorch's experiment_config): 100 epochs
# of 500 iterations, and their schedules move once per epoch.
MAMLPP_EPOCH = 500
MAMLPP_ITERATIONS = 50_000
MAMLPP_NETWORK = "mamlext.models:mamlpp_conv4"


def _resumable(default: Any) -> Any:
    """A :class:`TrainConfig` field that ``--resume`` may change.

    Every other field must equal the checkpoint's (:func:`_check_same_run`).
    """
    return dataclasses.field(default=default, metadata={"resumable": True})


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; ``None`` fields take the MAML paper's value for the data.

    Sinusoid: K=10 shots and queries, meta-batch 25, one step of 0.01, Adam 1e-3 (3000
    iterations by default, about a minute on 2 cores, where the paper trains 70,000).
    Omniglot: Conv-4 (64 filters, strided), 5-way meta-batch 32 / one step of 0.4,
    20-way meta-batch 16 / five steps of 0.1. Queries: as many as shots, per class on
    Omniglot (the paper's code, cbfinn/maml ``main.py``, samples 2K examples per class and
    splits them in two); one per class with ``algorithm="mamlpp"`` (MAML++'s configs).
    ``split_scheme`` as :func:`mamlext.data.omniglot.split_indices` ("vinyals": torchmeta's
    1028 training and 423 test characters; "maml": the paper's 1200 and 423).
    The outer learning rate (``meta_lr_schedule``) is ``"milestones"``: ``meta_lr`` times
    ``meta_lr_gamma`` per milestone passed (as ``torch.optim.lr_scheduler.MultiStepLR``; no
    milestones: constant, as the paper), or ``"cosine"``: annealed from ``meta_lr`` to
    ``meta_lr_min`` over the run.
    ``algorithm="mamlpp"`` is MAML++ as its authors' code computes it on Omniglot (Antoniou
    et al. 2019; docs/mamlpp.md): their network (``mamlext.models.mamlpp_conv4``), 5 inner
    steps at meta-train and meta-test, meta-batch 8, one query per class, learned per-layer
    per-step rates from 0.1, per-step BatchNorm weights with the query after step ``k`` on
    row ``k``, batch statistics always, the multi-step loss over the first 10 epochs, second
    order, Adam 1e-3 cosine-annealed to 1e-5 over 100 epochs of 500 iterations (50,000), the
    schedules moving once per epoch (``schedule_epoch``). Each of those fields, set
    explicitly, overrides it.
    Every ``eval_every`` iterations, ``periodic_eval_tasks`` test tasks are evaluated and a
    checkpoint is written; at the end, ``eval_tasks``. The fields declared ``_resumable`` may
    differ when a run is resumed; the others must equal the checkpoint's.
    """

    dataset: str = "sinusoid"
    data_root: str | None = _resumable(None)  # a run may move, e.g. to a GPU machine and back
    download: bool = _resumable(False)
    split_scheme: str = "vinyals"
    ways: int = 5
    shots: int | None = None
    query: int | None = None
    meta_batch: int | None = None
    inner_steps: int | None = None
    test_steps: int | None = None
    step_size: float | None = None
    first_order: bool = False
    algorithm: str = "maml"
    model: str | None = None  # None: the paper's network; else "package.module:factory"
    bn: str = "transductive"
    # MAML++ (--algorithm mamlpp turns each on; each may be set on its own)
    bn_per_step_weights: bool | None = None
    bn_query_row: str | None = None  # "own" | "last_step" (mamlpp on Omniglot)
    multi_step_loss: int | None = None  # iterations of the multi-step loss; 0: off
    multi_step_loss_floor: float = 0.03
    first_order_until: int = 0  # derivative-order annealing: first order before it
    # The multi-step loss and the outer rate move once per this many iterations (an epoch).
    schedule_epoch: int | None = None
    # activation checkpointing of the inner loop (memory, not results): may change on resume
    inner_checkpoint: int | str | None = _resumable(None)
    meta_lr: float = 1e-3
    # The schedule may change on resume only after the checkpoint's iteration.
    meta_lr_schedule: str | None = _resumable(None)
    meta_lr_min: float = _resumable(1e-5)
    meta_lr_milestones: tuple[int, ...] = _resumable(())
    meta_lr_gamma: float = _resumable(0.1)
    iterations: int | None = _resumable(None)
    eval_every: int | None = _resumable(None)
    periodic_eval_tasks: int = _resumable(100)
    eval_tasks: int = _resumable(600)
    device: str = _resumable("cpu")
    seed: int = 0
    out: str = _resumable("runs/mamlext")
    resume: bool = _resumable(False)
    plot: bool = _resumable(True)
    progress: bool = _resumable(True)

    @property
    def regression(self) -> bool:
        """Sinusoid/harmonic regression (MSE); otherwise Omniglot classification (accuracy)."""
        return self.dataset != "omniglot"

    @property
    def metric_name(self) -> str:
        """The key of the per-task metric in the metrics records."""
        return "mse" if self.regression else "accuracy"

    def _check_schedules_and_mamlpp_pieces(self) -> None:
        if self.meta_lr_schedule not in META_LR_SCHEDULES:
            raise ValueError(
                f"unknown --meta-lr-schedule {self.meta_lr_schedule!r}; choose from "
                f"{', '.join(META_LR_SCHEDULES)}"
            )
        if self.meta_lr_schedule == "cosine" and self.meta_lr_milestones:
            raise ValueError("--meta-lr-milestones apply to --meta-lr-schedule milestones only")
        if not 0 <= self.meta_lr_min <= self.meta_lr:
            raise ValueError("--meta-lr-min must be in [0, --meta-lr]")
        if not 0 <= self.multi_step_loss <= self.iterations:
            raise ValueError(
                f"--multi-step-loss {self.multi_step_loss} must be in 0..--iterations "
                f"({self.iterations}): the iterations over which its weights anneal"
            )
        if not 0 <= self.multi_step_loss_floor <= 1:
            raise ValueError("--multi-step-loss-floor must be in [0, 1]")
        if self.multi_step_loss and self.inner_steps < 1:
            raise ValueError("--multi-step-loss needs --inner-steps >= 1")
        if self.multi_step_loss and self.inner_checkpoint is not None:
            raise ValueError(
                "--multi-step-loss needs every inner step's graph, which --inner-checkpoint "
                "does not keep: use one or the other"
            )
        if self.first_order_until < 0:
            raise ValueError("--first-order-until must be >= 0")
        if self.schedule_epoch < 1:
            raise ValueError("--schedule-epoch must be >= 1")
        if self.bn_query_row not in QUERY_ROWS:
            raise ValueError(f"--bn-query-row must be one of {', '.join(QUERY_ROWS)}")

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` replaced by the paper's value, validated."""
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"unknown algorithm {self.algorithm!r}; choose from {', '.join(ALGORITHMS)}"
            )
        regression = self.regression
        wide = self.ways >= 20
        defaults = dict(
            shots=10 if regression else 1,
            meta_batch=25 if regression else (16 if wide else 32),
            inner_steps=1 if regression or not wide else 5,
            step_size=0.01 if regression else (0.1 if wide else 0.4),
            iterations=3000 if regression else 60000,
            eval_every=1000 if regression else 500,
            bn_per_step_weights=False,
            bn_query_row="own",
            multi_step_loss=0,
            meta_lr_schedule="milestones",
            schedule_epoch=1,
        )
        if self.algorithm == "mamlpp":
            defaults.update(
                inner_steps=5, test_steps=5, meta_lr_schedule="cosine",
                multi_step_loss=MAMLPP_MULTI_STEP_LOSS,
            )  # fmt: skip
            if not regression:  # the paper's Omniglot setting (the sinusoid's MLP has no BN)
                # Batch statistics at meta-test too: the paper's code normalises with them
                # always (docs/mamlpp.md); bn="per_step" is the paper's text, and an option.
                # One query example per class whatever the shots: the reference repository's
                # experiment_config/omniglot_maml++_* set "num_target_samples": 1.
                defaults.update(meta_batch=8, step_size=0.1, bn_per_step_weights=True, query=1)
                # The authors' code: the query after step k on BatchNorm row k, schedules per
                # epoch of 500 iterations over 100 epochs, their network.
                defaults.update(
                    bn_query_row="last_step", schedule_epoch=MAMLPP_EPOCH,
                    iterations=MAMLPP_ITERATIONS, model=MAMLPP_NETWORK,
                )  # fmt: skip
        values = {
            k: v if getattr(self, k) is None else getattr(self, k) for k, v in defaults.items()
        }
        config = dataclasses.replace(self, **values)
        if config.query is None:  # as many as the support: MAML's code samples 2K per class
            config.query = config.shots
        if self.algorithm == "mamlpp" and self.multi_step_loss is None:
            config.multi_step_loss = min(config.multi_step_loss, config.iterations)
        if config.test_steps is None:
            config.test_steps = 10 if regression else max(config.inner_steps, 3)
        config._check_schedules_and_mamlpp_pieces()
        if config.dataset == "omniglot" and config.data_root is None:
            raise ValueError(
                "--dataset omniglot needs --data-root DIR (add --download to fetch it)"
            )
        for name in (
            "shots", "query", "meta_batch", "iterations", "eval_every", "periodic_eval_tasks",
            "eval_tasks",
        ):  # fmt: skip
            if getattr(config, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if any(m < 1 for m in config.meta_lr_milestones) or config.meta_lr_gamma <= 0:
            raise ValueError("--meta-lr-milestones must be >= 1 and --meta-lr-gamma > 0")
        config.meta_lr_milestones = tuple(sorted(config.meta_lr_milestones))
        if config.ways < 2 and not config.regression:
            raise ValueError("--ways must be >= 2")
        try:
            check_setting(config.inner_checkpoint)
        except ValueError:
            raise ValueError(
                "--inner-checkpoint must be auto or a segment length in inner steps >= 1, got "
                f"{config.inner_checkpoint!r}"
            ) from None
        return config


def epoch_start(config: TrainConfig, iteration: int) -> int:
    """The first iteration of ``iteration``'s epoch: where the schedules read the time."""
    return iteration - iteration % config.schedule_epoch


def meta_lr_at(config: TrainConfig, iteration: int) -> float:
    """Outer learning rate of the step taken after ``iteration`` completed steps."""
    if config.meta_lr_schedule == "cosine":
        return cosine(
            config.meta_lr, config.meta_lr_min, epoch_start(config, iteration), config.iterations
        )
    passed = sum(iteration >= m for m in config.meta_lr_milestones)
    return config.meta_lr * config.meta_lr_gamma**passed


def first_order_at(config: TrainConfig, iteration: int) -> bool:
    """Whether the step after ``iteration`` completed steps is first order (FOMAML, or
    derivative-order annealing's first phase)."""
    fomaml = config.first_order or config.algorithm == "fomaml"
    return fomaml or iteration < config.first_order_until


def step_weights_at(config: TrainConfig, iteration: int) -> list[float] | None:
    """The multi-step loss's weights of the step after ``iteration`` steps (``None``: off)."""
    if not config.multi_step_loss:
        return None
    return multi_step_weights(
        config.inner_steps, epoch_start(config, iteration), config.multi_step_loss,
        config.multi_step_loss_floor,
    )  # fmt: skip
