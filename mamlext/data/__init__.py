"""Task data: the meta-batch format, few-shot samplers, Omniglot and toy regression tasks."""

from mamlext.data.omniglot import (
    CorruptDataError,
    OmniglotData,
    decode_png,
    download_omniglot,
    load_omniglot,
    omniglot_tasks,
    split_indices,
)
from mamlext.data.tasks import (
    Batch,
    FewShotTasks,
    SeededSampler,
    TaskDataset,
    derive_seed,
    rotate_classes,
)
from mamlext.data.toy import Harmonic, Sinusoid

__all__ = [
    "Batch",
    "CorruptDataError",
    "FewShotTasks",
    "Harmonic",
    "OmniglotData",
    "SeededSampler",
    "Sinusoid",
    "TaskDataset",
    "decode_png",
    "derive_seed",
    "download_omniglot",
    "load_omniglot",
    "omniglot_tasks",
    "rotate_classes",
    "split_indices",
]
