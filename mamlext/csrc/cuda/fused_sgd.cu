// CUDA kernel of mamlext::fused_sgd for ATen tensors: the checks, the learning-rate layout,
// one launch sequence per dtype on the current stream. The kernel itself, and how tensors are
// packed into launches, are in fused_sgd_kernel.cuh (tested on the CPU over emulated grids).
#include "../fused_sgd.h"
#include "fused_sgd_kernel.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

namespace mamlext {
namespace {

using cuda_kernel::FusedSgdArgs;
using cuda_kernel::TensorRef;

// One non-empty tensor of the list, with everything the kernel reads kept alive until the
// launches are enqueued (the caching allocator orders later reuse after them on the stream).
struct Item {
  at::Tensor out, p, g;
  LrLayout lr;
  size_t index;  // position in the op's lists, for messages
};

// Updates the items (all of dtype scalar_t) in as few launches as FusedSgdArgs allows.
template <typename scalar_t>
void launch_group(const std::vector<const Item*>& items, cudaStream_t stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  std::vector<TensorRef<scalar_t>> tensors;
  tensors.reserve(items.size());
  for (const Item* item : items) {
    TORCH_INTERNAL_ASSERT(item->out.numel() > 0 && item->lr.block >= 1 && item->lr.count >= 1);
    tensors.push_back(TensorRef<scalar_t>{
        item->out.data_ptr<scalar_t>(), item->p.const_data_ptr<scalar_t>(),
        item->g.const_data_ptr<scalar_t>(),
        item->lr.values.defined() ? item->lr.values.const_data_ptr<scalar_t>() : nullptr,
        // converted on the host, as the CPU kernel does
        static_cast<opmath_t>(item->lr.scalar), item->out.numel(), item->lr.block,
        item->lr.count});
  }
  const auto launch = [&](const FusedSgdArgs<scalar_t>& args, int64_t blocks) {
    TORCH_INTERNAL_ASSERT(args.num_tensors > 0 && blocks >= args.num_tensors);
    cuda_kernel::fused_sgd_kernel<scalar_t>
        <<<static_cast<unsigned int>(blocks), cuda_kernel::kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  int64_t too_large = 0;
  const bool planned = cuda_kernel::plan_launches(
      tensors.data(), static_cast<int64_t>(tensors.size()), launch, &too_large);
  TORCH_CHECK(
      planned, "mamlext.fused_sgd: params[", items[too_large]->index, "] has ",
      tensors[too_large].numel, " elements, more than the CUDA kernel supports (",
      cuda_kernel::kMaxChunksPerLaunch * cuda_kernel::kChunkSize, ")");
}

std::vector<at::Tensor> fused_sgd_cuda(
    at::TensorList params,
    at::TensorList grads,
    const c10::List<std::optional<at::Tensor>>& lrs,
    at::ArrayRef<double> lr_scalars) {
  check_fused_sgd_inputs(params, grads, lrs, lr_scalars, c10::DeviceType::CUDA);
  std::vector<at::Tensor> outs;
  if (params.empty()) {
    return outs;
  }
  const at::cuda::OptionalCUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  outs.reserve(params.size());
  std::vector<Item> items;
  items.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor out = at::empty(params[i].sizes(), params[i].options());
    outs.push_back(out);
    if (out.numel() == 0) {
      continue;
    }
    items.push_back(Item{
        out, params[i].contiguous(), grads[i].contiguous(),
        lr_layout(lrs.get(i), lr_scalars[i], params[i]), i});
  }

  // One launch sequence per dtype present, in order of first appearance.
  std::vector<bool> done(items.size(), false);
  for (size_t first = 0; first < items.size(); ++first) {
    if (done[first]) {
      continue;
    }
    const at::ScalarType dtype = items[first].out.scalar_type();
    std::vector<const Item*> group;
    for (size_t k = first; k < items.size(); ++k) {
      if (!done[k] && items[k].out.scalar_type() == dtype) {
        group.push_back(&items[k]);
        done[k] = true;
      }
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, dtype, "mamlext_fused_sgd_cuda",
        [&] { launch_group<scalar_t>(group, stream); });
  }
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, CUDA, m) {
  m.impl("fused_sgd", &fused_sgd_cuda);
}

}  // namespace mamlext
