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
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
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

// The backward node, written by hand as torch's generated nodes are: torch::autograd::
// Function<T> keeps generic bookkeeping for every input and output (36 inputs and 18
// outputs for a Conv-4) that measured ~15 us per call.
struct FusedSgdBackward final : torch::autograd::Node {
  // Edges: params[0..n), grads[0..n), then the present rates. As torch's mul saves each
  // factor only for the other's gradient, the rates are saved only if some grad needs its
  // gradient (d/dg = -lr go) and the grads only if some rate does (d/dlr = -g go).
  std::vector<torch::autograd::SavedVariable> rates;  // the lr tensors present, in order
  std::vector<torch::autograd::SavedVariable> grads;  // all n, or none
  std::vector<bool> present;                          // lrs[i] is a tensor
  std::vector<std::vector<int64_t>> rate_sizes;       // each present rate's shape
  std::vector<double> scalars;                        // lr_scalars
  bool saved_any = false;  // rates or grads were saved
  // Set by release_variables (a backward without retain_graph): the saved tensors are gone.
  bool released = false;

  std::string name() const override {
    return "FusedSgdBackward";
  }

  // As torch's generated nodes for their saved tensor lists: clear them, remember that they
  // were cleared, and answer a second backward with torch's own error (apply, below).
  void release_variables() override {
    const std::lock_guard<std::mutex> lock(mutex_);
    rates.clear();
    grads.clear();
    released = true;
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grad_outs) override {
    const std::lock_guard<std::mutex> lock(mutex_);
    const size_t n = present.size();
    // Where nothing was saved (float rates, say), a second backward is valid, as through
    // torch's add(p, g, alpha=-lr); otherwise the saved tensors must still be there.
    TORCH_CHECK(!(released && saved_any), torch::autograd::ERR_BACKWARD_TWICE);
    torch::autograd::variable_list result(2 * n + rate_sizes.size());
    for (size_t i = 0; i < n; ++i) {
      if (task_should_compute_output(i)) {
        result[i] = grad_outs[i];
      }
    }
    // d/dg = -lr * go and d/dlr = -(g * go) summed over the dims lr is broadcast along;
    // d/dg = -scalar * go for the scalar rates in one foreach call after the loop.
    std::vector<at::Tensor> scalar_outs;
    std::vector<at::Scalar> neg_scalars;
    std::vector<size_t> scalar_index;
    size_t rate = 0;  // index of entry i's rate among the present ones
    for (size_t i = 0; i < n; rate += present[i] ? 1 : 0, ++i) {
      const at::Tensor& go = grad_outs[i];
      if (!go.defined()) {
        continue;
      }
      if (!present[i]) {
        if (task_should_compute_output(n + i)) {
          scalar_outs.push_back(go);
          neg_scalars.emplace_back(-scalars[i]);
          scalar_index.push_back(i);
        }
        continue;
      }
      if (task_should_compute_output(n + i)) {  // grads[i] needs its gradient: rates saved
        TORCH_INTERNAL_ASSERT(rate < rates.size());
        result[n + i] = -(rates[rate].unpack() * go);
      }
      if (task_should_compute_output(2 * n + rate)) {  // the rate needs it: grads saved
        TORCH_INTERNAL_ASSERT(i < grads.size());
        result[2 * n + rate] = -(grads[i].unpack() * go).sum_to_size(rate_sizes[rate]);
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

// Nodes are held by c10::intrusive_ptr since torch 2.13 and by std::shared_ptr before.
template <typename NodeT, typename Ptr = decltype(torch::autograd::Edge::function)>
Ptr make_node() {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<NodeT>(new NodeT());
  } else {
    return c10::make_intrusive<NodeT>();
  }
}

// The AutogradCPU / AutogradCUDA kernel.
inline std::vector<at::Tensor> fused_sgd_autograd(
    at::TensorList params,
    at::TensorList grads,
    const c10::List<std::optional<at::Tensor>>& lrs,
    at::ArrayRef<double> lr_scalars) {
  std::vector<at::Tensor> outs = fused_sgd_below_autograd(params, grads, lrs, lr_scalars);
  if (!at::GradMode::is_enabled()) {
    return outs;
  }
  std::vector<at::Tensor> rates;
  std::vector<bool> present;
  present.reserve(lrs.size());
  for (size_t i = 0; i < lrs.size(); ++i) {
    const std::optional<at::Tensor> lr = lrs.get(i);
    present.push_back(lr.has_value());
    if (lr.has_value()) {
      rates.push_back(*lr);
    }
  }
  if (!torch::autograd::compute_requires_grad(params, grads, at::TensorList(rates))) {
    return outs;
  }
  auto node = make_node<FusedSgdBackward>();
  auto& backward = static_cast<FusedSgdBackward&>(*node);
  node->set_next_edges(
      torch::autograd::collect_next_edges(params, grads, at::TensorList(rates)));
  const auto needs_grad = [](const at::Tensor& t) { return t.requires_grad(); };
  if (std::any_of(grads.begin(), grads.end(), needs_grad)) {
    for (const at::Tensor& rate : rates) {
      backward.rates.emplace_back(rate, /*is_output=*/false);
    }
  }
  if (std::any_of(rates.begin(), rates.end(), needs_grad)) {
    for (const at::Tensor& grad : grads) {
      backward.grads.emplace_back(grad, /*is_output=*/false);
    }
  }
  backward.saved_any = !backward.rates.empty() || !backward.grads.empty();
  for (const at::Tensor& rate : rates) {
    backward.rate_sizes.emplace_back(rate.sizes().vec());
  }
  backward.present = std::move(present);
  backward.scalars.assign(lr_scalars.begin(), lr_scalars.end());
  torch::autograd::set_history(outs, node);
  return outs;
}

}  // namespace mamlext
