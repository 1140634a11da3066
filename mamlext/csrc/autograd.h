// The autograd rule of mamlext::fused_sgd in C++, for the devices with a native kernel:
// registered as AutogradCPU (cpu/fused_sgd.cpp) and AutogradCUDA (cuda/autograd.cpp), it
// takes precedence there over the Python rule that torch.library registers for every
// device (mamlext/ops/__init__.py), which costs more than the kernel on small lists.
// The formula is that rule's, written with differentiable ATen ops, so the backward is
// itself differentiable (second-order MAML):
//   d/dp_i = go_i,   d/dg_i = -lr_i * go_i,   d/dlr_i = -sum_broadcast(g_i * go_i)
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <vector>

namespace mamlext {

using FusedSgdSignature = std::vector<at::Tensor>(
    at::TensorList, at::TensorList, const c10::List<std::optional<at::Tensor>>&,
    at::ArrayRef<double>);

// The op's kernel for the inputs' device (native, or the Python reference), skipping autograd.
inline std::vector<at::Tensor> fused_sgd_below_autograd(
    at::TensorList params,
    at::TensorList grads,
    const c10::List<std::optional<at::Tensor>>& lrs,
    at::ArrayRef<double> lr_scalars) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mamlext::fused_sgd", "")
                             .typed<FusedSgdSignature>();
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(params, grads, lrs, lr_scalars);
}

class FusedSgdFunction : public torch::autograd::Function<FusedSgdFunction> {
 public:
  // `rates` repeats the lr tensors present in `lrs`, in order, so that autograd sees them
  // (it does not look inside a Tensor?[]).
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      at::TensorList params,
      at::TensorList grads,
      at::TensorList rates,
      const c10::List<std::optional<at::Tensor>>& lrs,
      at::ArrayRef<double> lr_scalars) {
    c10::List<bool> present;
    bool rate_needs_grad = false;
    for (size_t i = 0; i < lrs.size(); ++i) {
      present.push_back(lrs.get(i).has_value());
    }
    for (const at::Tensor& rate : rates) {
      rate_needs_grad = rate_needs_grad || rate.requires_grad();
    }
    ctx->saved_data["lr_present"] = present;
    ctx->saved_data["lr_scalars"] = std::vector<double>(lr_scalars.begin(), lr_scalars.end());
    // The rates give the grads' gradient; the grads only the rates' gradient.
    std::vector<at::Tensor> saved(rates.begin(), rates.end());
    if (rate_needs_grad) {
      saved.insert(saved.end(), grads.begin(), grads.end());
    }
    ctx->save_for_backward(saved);
    return fused_sgd_below_autograd(params, grads, lrs, lr_scalars);
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_outs) {
    const std::vector<at::Tensor> saved = ctx->get_saved_variables();
    const c10::List<bool> present = ctx->saved_data["lr_present"].toBoolList();
    const std::vector<double> scalars = ctx->saved_data["lr_scalars"].toDoubleVector();
    const size_t n = grad_outs.size();
    size_t num_rates = 0;
    for (size_t i = 0; i < n; ++i) {
      num_rates += present.get(i) ? 1 : 0;
    }
    // One gradient per forward input: params, grads, rates, then lrs and lr_scalars (none).
    torch::autograd::variable_list result(2 * n + num_rates + 2);
    for (size_t i = 0; i < n; ++i) {
      result[i] = grad_outs[i];
    }
    // d/dg = -lr * go and d/dlr = -(g * go) summed over the dims lr is broadcast along;
    // d/dg = -scalar * go for the scalar rates in one foreach call after the loop.
    std::vector<at::Tensor> scalar_outs;
    std::vector<at::Scalar> neg_scalars;
    std::vector<size_t> scalar_index;
    size_t rate = 0;  // index of entry i's rate among the present ones
    for (size_t i = 0; i < n; rate += present.get(i) ? 1 : 0, ++i) {
      const at::Tensor& go = grad_outs[i];
      if (!go.defined()) {
        continue;
      }
      if (!present.get(i)) {
        if (ctx->needs_input_grad(n + i)) {
          scalar_outs.push_back(go);
          neg_scalars.emplace_back(-scalars[i]);
          scalar_index.push_back(i);
        }
        continue;
      }
      const at::Tensor& lr = saved[rate];
      if (ctx->needs_input_grad(n + i)) {
        result[n + i] = -(lr * go);
      }
      if (ctx->needs_input_grad(2 * n + rate)) {  // then the grads were saved
        result[2 * n + rate] = -(saved[num_rates + i] * go).sum_to_size(lr.sizes());
      }
    }
    if (!scalar_outs.empty()) {
      std::vector<at::Tensor> products = at::_foreach_mul(scalar_outs, neg_scalars);
      for (size_t k = 0; k < products.size(); ++k) {
        result[n + scalar_index[k]] = std::move(products[k]);
      }
    }
    return result;
  }
};

// The AutogradCPU / AutogradCUDA kernel.
inline std::vector<at::Tensor> fused_sgd_autograd(
    at::TensorList params,
    at::TensorList grads,
    const c10::List<std::optional<at::Tensor>>& lrs,
    at::ArrayRef<double> lr_scalars) {
  if (!at::GradMode::is_enabled()) {
    return fused_sgd_below_autograd(params, grads, lrs, lr_scalars);
  }
  std::vector<at::Tensor> rates;
  for (size_t i = 0; i < lrs.size(); ++i) {
    const std::optional<at::Tensor> lr = lrs.get(i);
    if (lr.has_value()) {
      rates.push_back(*lr);
    }
  }
  return FusedSgdFunction::apply(params, grads, at::TensorList(rates), lrs, lr_scalars);
}

}  // namespace mamlext
