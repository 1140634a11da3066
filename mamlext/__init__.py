"""mamlext: fast, exact MAML-style meta-learning for PyTorch."""

from mamlext.ops import backend_info, fused_sgd

__version__ = "0.1.0"

__all__ = ["backend_info", "fused_sgd", "__version__"]
