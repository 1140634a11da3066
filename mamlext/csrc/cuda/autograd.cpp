// Registers the C++ autograd rule of mamlext::fused_sgd (../autograd.h) for CUDA tensors.
// A C++ file of the CUDA library: nvcc need not compile torch's autograd headers.
#include "../autograd.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(mamlext, AutogradCUDA, m) {
  m.impl("fused_sgd", &mamlext::fused_sgd_autograd);
}
