"""MAML and its variants (first order, Meta-SGD, MAML++, ANIL) over a meta-batch of tasks.

Files: ``algorithm.py`` (:class:`MAML`: a meta-batch's checks, the query losses, the entry
points), ``inner_loop.py`` (the inner SGD steps, for one task or all at once),
``losses.py`` (each task's loss), ``checks.py`` (the input contract), ``batchnorm.py``
(:class:`BatchNormPolicy`), ``step_sizes.py`` (:class:`StepSizes`), ``recompute.py`` (the
inner loop recomputed in backward: ``inner_checkpoint``).
"""

from mamlext.maml.algorithm import CPU_BATCHED_MAX_SAMPLES, MAML, MetaBatch
from mamlext.maml.batchnorm import BatchNormPolicy
from mamlext.maml.inner_loop import InnerLoop
from mamlext.maml.losses import TaskLoss
from mamlext.maml.step_sizes import STEP_SIZE_MODES, StepSizes

__all__ = [
    "CPU_BATCHED_MAX_SAMPLES", "MAML", "MetaBatch", "BatchNormPolicy", "InnerLoop", "TaskLoss",
    "STEP_SIZE_MODES", "StepSizes",
]  # fmt: skip
