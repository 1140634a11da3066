"""mamlext: fast, exact MAML-style meta-learning for PyTorch."""

from mamlext.inner import gradient_update_parameters
from mamlext.maml import MAML
from mamlext.modules.norm import BatchNormPolicy
from mamlext.ops import backend_info, fused_sgd
from mamlext.step_sizes import StepSizes

__version__ = "0.1.0"

__all__ = [
    "MAML", "BatchNormPolicy", "StepSizes", "backend_info", "fused_sgd",
    "gradient_update_parameters", "__version__",
]  # fmt: skip
