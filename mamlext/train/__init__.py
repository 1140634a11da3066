"""``mamlext train``: meta-training runs with checkpoints, resume, evaluation and plots.

Files: ``config.py`` (:class:`TrainConfig`, the paper's presets, the schedules),
``build.py`` (samplers and the model of a config), ``loop.py`` (:func:`train`: the steps,
safe stops), ``folder.py`` (the output folder's lock), ``run_checkpoint.py`` (the run's
``checkpoint.pt``: atomic writes, validation, what resuming may change),
``evaluation.py`` (meta-test), ``plots.py`` (the figures).
"""

from mamlext.train.build import build_maml, build_sampler
from mamlext.train.config import (
    ALGORITHMS,
    DATASETS,
    TrainConfig,
    first_order_at,
    meta_lr_at,
    step_weights_at,
)
from mamlext.train.evaluation import (
    QUERY_MODES,
    evaluate,
    evaluate_checkpoint,
    query_outputs,
    task_metric,
    to_device,
)
from mamlext.train.folder import OutFolderInUse
from mamlext.train.loop import RunStopped, train
from mamlext.train.run_checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_run_checkpoint,
    save_checkpoint,
)

__all__ = [
    "ALGORITHMS", "DATASETS", "QUERY_MODES", "CheckpointError", "OutFolderInUse", "RunStopped",
    "TrainConfig", "build_maml", "build_sampler", "evaluate", "evaluate_checkpoint",
    "first_order_at", "load_checkpoint", "load_run_checkpoint", "meta_lr_at", "query_outputs",
    "save_checkpoint", "step_weights_at", "task_metric", "to_device", "train",
]  # fmt: skip
