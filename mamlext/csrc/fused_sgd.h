// Shared by the CPU and CUDA kernels of mamlext::fused_sgd:
//   out_i = p_i - lr_i * g_i   for every tensor i of a list.
// Each lr_i is either the scalar lr_scalars[i] (when lrs[i] is None) or a tensor that
// broadcasts to p_i's shape.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace mamlext {

// A learning rate laid out for a flat kernel: element j of p uses lr[j / block]
// (lr == nullptr means the scalar `scalar`). Covers a scalar (block = numel), a full
// Meta-SGD tensor (block = 1) and per-task rates [T, 1, ..., 1] (block = numel / T)
// without copies; any other broadcast is materialised once.
struct LrLayout {
  at::Tensor values;  // undefined for a scalar lr
  double scalar = 0.0;
  int64_t block = 1;
};

inline void check_fused_sgd_inputs(
    at::TensorList params,
    at::TensorList grads,
    const c10::List<std::optional<at::Tensor>>& lrs,
    at::ArrayRef<double> lr_scalars,
    c10::DeviceType device_type) {
  const size_t n = params.size();
  TORCH_CHECK(
      grads.size() == n && lrs.size() == n && lr_scalars.size() == n,
      "mamlext.fused_sgd: params, grads, lrs and lr_scalars must have the same length, got ",
      n, ", ", grads.size(), ", ", lrs.size(), " and ", lr_scalars.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(
        p.device().type() == device_type,
        "mamlext.fused_sgd: params[", i, "] is on ", p.device(), ", expected a ",
        c10::DeviceTypeName(device_type), " tensor");
    TORCH_CHECK(
        at::isFloatingType(p.scalar_type()),
        "mamlext.fused_sgd: params[", i, "] has dtype ", p.scalar_type(),
        "; only floating-point tensors can be updated");
    TORCH_CHECK(
        g.sizes() == p.sizes(), "mamlext.fused_sgd: grads[", i, "] has shape ", g.sizes(),
        " but params[", i, "] has shape ", p.sizes());
    TORCH_CHECK(
        g.scalar_type() == p.scalar_type(), "mamlext.fused_sgd: grads[", i, "] has dtype ",
        g.scalar_type(), " but params[", i, "] has dtype ", p.scalar_type());
    TORCH_CHECK(
        g.device() == p.device(), "mamlext.fused_sgd: grads[", i, "] is on ", g.device(),
        " but params[", i, "] is on ", p.device());
    const std::optional<at::Tensor> lr = lrs.get(i);
    if (!lr.has_value()) {
      continue;
    }
    TORCH_CHECK(
        lr->scalar_type() == p.scalar_type(), "mamlext.fused_sgd: lrs[", i, "] has dtype ",
        lr->scalar_type(), " but params[", i, "] has dtype ", p.scalar_type());
    TORCH_CHECK(
        lr->device() == p.device(), "mamlext.fused_sgd: lrs[", i, "] is on ", lr->device(),
        " but params[", i, "] is on ", p.device());
    bool broadcasts = lr->dim() <= p.dim();
    for (int64_t d = 1; broadcasts && d <= lr->dim(); ++d) {
      const int64_t s = lr->size(-d);
      broadcasts = s == 1 || s == p.size(-d);
    }
    TORCH_CHECK(
        broadcasts, "mamlext.fused_sgd: lrs[", i, "] of shape ", lr->sizes(),
        " does not broadcast to params[", i, "] of shape ", p.sizes());
  }
}

inline LrLayout lr_layout(const std::optional<at::Tensor>& lr, double scalar, const at::Tensor& p) {
  LrLayout layout;
  if (!lr.has_value()) {
    layout.scalar = scalar;
    layout.block = std::max<int64_t>(p.numel(), 1);
    return layout;
  }
  const int64_t pad = p.dim() - lr->dim();
  // lr varies only over p's dims [0, varying); the trailing dims are all 1.
  int64_t varying = 0;
  for (int64_t d = 0; d < lr->dim(); ++d) {
    if (lr->size(d) != 1) {
      varying = pad + d + 1;
    }
  }
  bool leading_match = true;
  for (int64_t d = 0; d < varying; ++d) {
    const int64_t s = d < pad ? 1 : lr->size(d - pad);
    leading_match = leading_match && s == p.size(d);
  }
  if (leading_match) {
    int64_t block = 1;
    for (int64_t d = varying; d < p.dim(); ++d) {
      block *= p.size(d);
    }
    layout.values = lr->contiguous();
    layout.block = std::max<int64_t>(block, 1);
  } else {
    layout.values = lr->expand(p.sizes()).contiguous();
    layout.block = 1;
  }
  return layout;
}

}  // namespace mamlext
