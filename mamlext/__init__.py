"""mamlext: fast, exact MAML-style meta-learning for PyTorch."""

from mamlext.inner import gradient_update_parameters
from mamlext.maml import MAML, BatchNormPolicy, StepSizes
from mamlext.ops import backend_info, fused_sgd
from mamlext.version import __version__

__all__ = [
    "MAML", "BatchNormPolicy", "StepSizes", "backend_info", "fused_sgd",
    "gradient_update_parameters", "__version__",
]  # fmt: skip
