"""The fused inner-loop update ``mamlext::fused_sgd``: ``out_i = p_i - lr_i * g_i`` for a
whole list of tensors in one native call, differentiable to any order.

Files: ``wrapper.py`` (the public function), ``library.py`` (the op's schema and its
registration with ``torch.library``), ``reference.py`` (the pure-PyTorch kernel and the
input checks), ``autograd.py`` (the autograd rule), ``native.py`` (building, loading and
choosing the C++/CUDA kernels). How they fit with the C++ side: ``csrc/README.md``.
"""

from mamlext.ops.native import BackendStatus, backend_info
from mamlext.ops.reference import reference_fused_sgd
from mamlext.ops.wrapper import LearningRate, fused_sgd

__all__ = ["fused_sgd", "reference_fused_sgd", "backend_info", "BackendStatus", "LearningRate"]
