// Shared by the CPU and CUDA kernels of mamlext::fused_sgd:
//   out_i = p_i - lr_i * g_i   for every tensor i of a list.
// Each lr_i is either the scalar lr_scalars[i] (when lrs[i] is None) or a tensor that
// broadcasts to p_i's shape.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace mamlext {

// A learning rate laid out for a flat kernel: element j of p uses
// lr[(j / block) % count] (lr undefined means the scalar `scalar`). Without copies this
// covers a scalar (count = 1), a full Meta-SGD tensor (block = 1, count = numel), Meta-SGD
// rates shared by T tasks ([*shape] for p [T, *shape]: block = 1, count = numel / T) and
// per-task rates [T, 1, ..., 1] (block = numel / T, count = T); any other broadcast is
// materialised once (block = 1, count = numel).
struct LrLayout {
  at::Tensor values;  // undefined for a scalar lr
  double scalar = 0.0;
  int64_t block = 1;
  int64_t count = 1;
};

// Shapes and dtypes spelled as Python spells them, so that the native kernels' messages
// equal the pure-PyTorch reference's: (3, 4) and torch.float32.
inline std::string py_shape(at::IntArrayRef sizes) {
  std::string text = "(";
  for (size_t d = 0; d < sizes.size(); ++d) {
    text += (d ? ", " : "") + std::to_string(sizes[d]);
  }
  return text + (sizes.size() == 1 ? ",)" : ")");
}

inline std::string py_dtype(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

// The op's input contract, shared by every kernel and raising what the pure-PyTorch
// reference raises (mamlext/ops/__init__.py, check_inputs): TypeError for a wrong dtype,
// ValueError for anything else, each naming the offending index.
inline void check_fused_sgd_inputs(
    at::TensorList params,
    at::TensorList grads,
    const c10::List<std::optional<at::Tensor>>& lrs,
    at::ArrayRef<double> lr_scalars,
    c10::DeviceType device_type) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(
      grads.size() == n && lrs.size() == n && lr_scalars.size() == n,
      "mamlext.fused_sgd: params, grads, lrs and lr_scalars must have the same length, got ",
      n, ", ", grads.size(), ", ", lrs.size(), " and ", lr_scalars.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    // One kernel reads the whole list, so every tensor must be on params[0]'s device.
    TORCH_CHECK_VALUE(
        p.device() == params[0].device(), "mamlext.fused_sgd: params[", i, "] is on ",
        p.device(), " but params[0] is on ", params[0].device(),
        "; all tensors must be on one device");
    TORCH_CHECK_TYPE(
        at::isFloatingType(p.scalar_type()),
        "mamlext.fused_sgd: params[", i, "] has dtype ", py_dtype(p.scalar_type()),
        "; only floating-point tensors can be updated");
    TORCH_CHECK_VALUE(
        g.sizes() == p.sizes(), "mamlext.fused_sgd: grads[", i, "] has shape ", py_shape(g.sizes()),
        " but params[", i, "] has shape ", py_shape(p.sizes()));
    TORCH_CHECK_TYPE(
        g.scalar_type() == p.scalar_type(), "mamlext.fused_sgd: grads[", i, "] has dtype ",
        py_dtype(g.scalar_type()), " but params[", i, "] has dtype ", py_dtype(p.scalar_type()));
    TORCH_CHECK_VALUE(
        g.device() == p.device(), "mamlext.fused_sgd: grads[", i, "] is on ", g.device(),
        " but params[", i, "] is on ", p.device());
    const std::optional<at::Tensor> lr = lrs.get(i);
    if (!lr.has_value()) {
      continue;
    }
    TORCH_CHECK_TYPE(
        lr->scalar_type() == p.scalar_type(), "mamlext.fused_sgd: lrs[", i, "] has dtype ",
        py_dtype(lr->scalar_type()), " but params[", i, "] has dtype ", py_dtype(p.scalar_type()));
    TORCH_CHECK_VALUE(
        lr->device() == p.device(), "mamlext.fused_sgd: lrs[", i, "] is on ", lr->device(),
        " but params[", i, "] is on ", p.device());
    bool broadcasts = lr->dim() <= p.dim();
    for (int64_t d = 1; broadcasts && d <= lr->dim(); ++d) {
      const int64_t s = lr->size(-d);
      broadcasts = s == 1 || s == p.size(-d);
    }
    TORCH_CHECK_VALUE(
        broadcasts, "mamlext.fused_sgd: lrs[", i, "] of shape ", py_shape(lr->sizes()),
        " does not broadcast to params[", i, "] of shape ", py_shape(p.sizes()));
  }
  // Every tensor is on params[0]'s device now; the dispatcher chose this kernel by it.
  TORCH_INTERNAL_ASSERT(
      n == 0 || params[0].device().type() == device_type, "mamlext.fused_sgd: a ",
      c10::DeviceTypeName(device_type), " kernel was called for tensors on ", params[0].device());
}

inline LrLayout lr_layout(const std::optional<at::Tensor>& lr, double scalar, const at::Tensor& p) {
  LrLayout layout;
  if (!lr.has_value()) {
    layout.scalar = scalar;
    layout.block = std::max<int64_t>(p.numel(), 1);
    return layout;
  }
  // In p's dims (lr left-padded with 1s), find the dims [first, last) where lr varies;
  // without copies, lr must equal p's size on all of them.
  const int64_t pad = p.dim() - lr->dim();
  const auto lr_size = [&](int64_t d) { return d < pad ? 1 : lr->size(d - pad); };
  int64_t first = p.dim();
  int64_t last = 0;
  for (int64_t d = 0; d < p.dim(); ++d) {
    if (lr_size(d) != 1) {
      first = std::min(first, d);
      last = d + 1;
    }
  }
  bool contiguous_span = true;
  int64_t block = 1;
  int64_t count = 1;
  for (int64_t d = 0; d < p.dim(); ++d) {
    if (d >= first && d < last) {
      contiguous_span = contiguous_span && lr_size(d) == p.size(d);
      count *= p.size(d);
    } else if (d >= last) {
      block *= p.size(d);
    }
  }
  if (contiguous_span) {
    layout.values = lr->contiguous();
    layout.block = std::max<int64_t>(block, 1);
    layout.count = std::max<int64_t>(count, 1);
  } else {
    layout.values = lr->expand(p.sizes()).contiguous();
    layout.block = 1;
    layout.count = std::max<int64_t>(p.numel(), 1);
  }
  return layout;
}

}  // namespace mamlext
