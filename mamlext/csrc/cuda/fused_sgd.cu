// CUDA kernel of mamlext::fused_sgd:  out_i = p_i - lr_i * g_i  for every tensor of a list,
// as a multi-tensor apply (in the spirit of apex's multi_tensor_apply.cuh):
//
//  * Tensors are grouped by dtype. Within a group every tensor is cut into chunks of
//    kChunkSize elements and ONE thread block updates one chunk, so one launch covers
//    many tensors of any sizes. The tensors of a launch are described by FusedSgdArgs,
//    passed by value as the kernel argument (under the 4 KB argument limit); it holds
//    up to kMaxTensors tensors, so a group of n tensors takes ceil(n / kMaxTensors)
//    launches (more only if one launch would exceed 2^31 - 1 blocks).
//  * Block b finds its tensor by a binary search in FusedSgdArgs::first_chunk.
//  * Each thread moves 16 bytes per operand per iteration (4 floats, 2 doubles, 8 halves)
//    when out, p, g (and an element-wise lr) are 16-byte aligned, then a scalar tail;
//    misaligned tensors take the scalar loop.
//  * The update is ONE fused multiply-add in opmath (float for half/bfloat16), rounded
//    once to nearest, then rounded to the tensor's dtype.
#include "../fused_sgd.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace mamlext {
namespace {

constexpr int64_t kChunkSize = 1 << 16;  // elements per chunk, i.e. per thread block
constexpr int kThreads = 512;            // threads per block
constexpr int kVecBytes = 16;            // bytes per operand a thread moves per vector step
constexpr int kMaxTensors = 56;          // tensors per launch (FusedSgdArgs < 4 KB)
// Blocks per launch: gridDim.x may not exceed 2^31 - 1, and first_chunk is int32.
constexpr int64_t kMaxChunksPerLaunch = std::numeric_limits<int32_t>::max();

// Chunk starts keep a tensor's 16-byte alignment for every dtype (2 bytes: the smallest).
static_assert(kChunkSize * 2 % kVecBytes == 0, "chunk starts must keep 16-byte alignment");

// The kernel argument of one launch. Entry t (t < num_tensors) of each array describes the
// t-th tensor of the launch; every tensor is contiguous and has at least one element.
template <typename scalar_t>
struct FusedSgdArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* out[kMaxTensors];       // the new tensor, written
  const scalar_t* p[kMaxTensors];   // the parameters
  const scalar_t* g[kMaxTensors];   // the gradients
  const scalar_t* lr[kMaxTensors];  // lr values: element j uses
                                    // lr[(j / lr_block) % lr_count];
                                    // nullptr: every element uses scalar[t]
  opmath_t scalar[kMaxTensors];     // the scalar lr (used when lr[t] is nullptr)
  int64_t numel[kMaxTensors];       // number of elements (> 0)
  int64_t lr_block[kMaxTensors];    // consecutive elements sharing one lr value (>= 1)
  int64_t lr_count[kMaxTensors];    // lr values before they repeat (>= 1)
  // Blocks first_chunk[t] <= b < first_chunk[t + 1] update tensor t: block b its elements
  // [c * kChunkSize, min((c + 1) * kChunkSize, numel[t])) with c = b - first_chunk[t].
  // first_chunk[num_tensors] is the number of blocks of the launch.
  int32_t first_chunk[kMaxTensors + 1];
  int32_t num_tensors;
};
static_assert(
    sizeof(FusedSgdArgs<double>) <= 4096 && sizeof(FusedSgdArgs<float>) <= 4096,
    "the kernel argument must stay under the 4 KB limit");

// p - rate * g as one fused multiply-add, rounded once to nearest.
__device__ __forceinline__ float sgd_step(float p, float rate, float g) {
  return __fmaf_rn(-rate, g, p);
}

__device__ __forceinline__ double sgd_step(double p, double rate, double g) {
  return __fma_rn(-rate, g, p);
}

// kN elements of type T, loaded and stored as one aligned access.
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Vec {
  T v[kN];
};

template <typename T>
__device__ __forceinline__ bool is_vec_aligned(const T* ptr) {
  return reinterpret_cast<std::uintptr_t>(ptr) % kVecBytes == 0;
}

// j / block for non-negative operands, in 32 bits when both fit (several times cheaper).
__device__ __forceinline__ int64_t div_nonneg(int64_t j, int64_t block) {
  if (((j | block) >> 32) == 0) {
    return static_cast<uint32_t>(j) / static_cast<uint32_t>(block);
  }
  return j / block;
}

// The learning rate of element i of a chunk (i: index within the chunk), three layouts.
// at(i) gives one rate; at_vec(i, r) the rates of elements i .. i + kN - 1, where i is a
// multiple of kN; vec_ok() says whether at_vec may be used (alignment).

// lr_layout gave a scalar: one rate for the whole tensor.
template <typename opmath_t>
struct ScalarRate {
  opmath_t value;
  __device__ bool vec_ok() const { return true; }
  __device__ opmath_t at(int /*i*/) const { return value; }
  template <int kN>
  __device__ void at_vec(int /*i*/, opmath_t (&r)[kN]) const {
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      r[k] = value;
    }
  }
};

// lr_block == 1 and lr_count == numel: one rate per element (Meta-SGD). lr points at
// the chunk's first rate.
template <typename scalar_t>
struct ElementwiseRate {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ lr;
  __device__ bool vec_ok() const { return is_vec_aligned(lr); }
  __device__ opmath_t at(int i) const { return static_cast<opmath_t>(lr[i]); }
  template <int kN>
  __device__ void at_vec(int i, opmath_t (&r)[kN]) const {
    const Vec<scalar_t, kN> v = *reinterpret_cast<const Vec<scalar_t, kN>*>(lr + i);
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      r[k] = static_cast<opmath_t>(v.v[k]);
    }
  }
};

// Any other layout: element j of the TENSOR (j = begin + i) uses lr[(j / block) % count]
// (per-task rates: count = T; Meta-SGD rates shared by the tasks: block = 1).
template <typename scalar_t>
struct BlockedRate {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ lr;  // the tensor's first rate (not offset to the chunk)
  int64_t begin;                    // index in the tensor of the chunk's first element
  int64_t block;
  int64_t count;
  __device__ bool vec_ok() const { return true; }
  __device__ opmath_t at(int i) const {
    return static_cast<opmath_t>(lr[div_nonneg(begin + i, block) % count]);
  }
  template <int kN>
  __device__ void at_vec(int i, opmath_t (&r)[kN]) const {
    // One division per vector; kN consecutive elements cross block boundaries at most
    // kN - 1 times (block may be 2 or 3).
    const int64_t j = begin + i;
    const int64_t q = div_nonneg(j, block);
    int64_t offset = j - q * block;  // position of element j within its lr block
    int64_t b = q % count;           // the rate of that block
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      r[k] = static_cast<opmath_t>(lr[b]);
      if (++offset == block) {
        offset = 0;
        if (++b == count) {
          b = 0;
        }
      }
    }
  }
};

// out[i] = p[i] - rate(i) * g[i] for 0 <= i < len, by the kThreads threads of the block.
// out, p and g point at the chunk's first element.
template <typename scalar_t, typename Rate>
__device__ __forceinline__ void update_chunk(
    scalar_t* __restrict__ out,
    const scalar_t* __restrict__ p,
    const scalar_t* __restrict__ g,
    int len,
    const Rate& rate) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  using V = Vec<scalar_t, kVec>;
  static_assert(sizeof(V) == kVecBytes, "one vector access per operand");

  int vec_end = 0;  // elements [0, vec_end) are done by the vector loop
  if (is_vec_aligned(out) && is_vec_aligned(p) && is_vec_aligned(g) && rate.vec_ok()) {
    vec_end = len - len % kVec;
    // i is a multiple of kVec, so i < vec_end implies i + kVec <= vec_end.
    for (int i = static_cast<int>(threadIdx.x) * kVec; i < vec_end; i += kThreads * kVec) {
      const V pv = *reinterpret_cast<const V*>(p + i);
      const V gv = *reinterpret_cast<const V*>(g + i);
      opmath_t r[kVec];
      rate.at_vec(i, r);
      V ov;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        ov.v[k] = static_cast<scalar_t>(
            sgd_step(static_cast<opmath_t>(pv.v[k]), r[k], static_cast<opmath_t>(gv.v[k])));
      }
      *reinterpret_cast<V*>(out + i) = ov;
    }
  }
  // The tail after the vector loop (< kVec elements), or the whole chunk if misaligned.
  for (int i = vec_end + static_cast<int>(threadIdx.x); i < len; i += kThreads) {
    out[i] = static_cast<scalar_t>(
        sgd_step(static_cast<opmath_t>(p[i]), rate.at(i), static_cast<opmath_t>(g[i])));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) fused_sgd_kernel(const FusedSgdArgs<scalar_t> args) {
  // This block's tensor: the last t with first_chunk[t] <= blockIdx.x. first_chunk is
  // strictly increasing (every tensor has >= 1 chunk) and first_chunk[0] == 0.
  const int32_t block_index = static_cast<int32_t>(blockIdx.x);
  int lo = 0;
  int hi = args.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (args.first_chunk[mid] <= block_index) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int t = lo;

  const int64_t begin = static_cast<int64_t>(block_index - args.first_chunk[t]) * kChunkSize;
  const int64_t remaining = args.numel[t] - begin;  // > 0
  const int len = static_cast<int>(remaining < kChunkSize ? remaining : kChunkSize);
  scalar_t* out = args.out[t] + begin;
  const scalar_t* p = args.p[t] + begin;
  const scalar_t* g = args.g[t] + begin;
  const scalar_t* lr = args.lr[t];
  // The branch is uniform over the block.
  if (lr == nullptr) {
    update_chunk(out, p, g, len, ScalarRate<at::opmath_type<scalar_t>>{args.scalar[t]});
  } else if (args.lr_block[t] == 1 && args.lr_count[t] == args.numel[t]) {
    update_chunk(out, p, g, len, ElementwiseRate<scalar_t>{lr + begin});
  } else {
    update_chunk(
        out, p, g, len, BlockedRate<scalar_t>{lr, begin, args.lr_block[t], args.lr_count[t]});
  }
}

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
  FusedSgdArgs<scalar_t> args{};
  int num_tensors = 0;
  int64_t num_chunks = 0;

  const auto launch = [&] {
    TORCH_INTERNAL_ASSERT(num_tensors > 0 && num_tensors <= kMaxTensors);
    TORCH_INTERNAL_ASSERT(num_chunks >= num_tensors && num_chunks <= kMaxChunksPerLaunch);
    args.first_chunk[num_tensors] = static_cast<int32_t>(num_chunks);
    args.num_tensors = num_tensors;
    fused_sgd_kernel<scalar_t>
        <<<static_cast<unsigned int>(num_chunks), kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    num_tensors = 0;
    num_chunks = 0;
  };

  for (const Item* item : items) {
    const int64_t numel = item->out.numel();
    TORCH_INTERNAL_ASSERT(numel > 0 && item->lr.block >= 1 && item->lr.count >= 1);
    const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
    TORCH_CHECK(
        chunks <= kMaxChunksPerLaunch, "mamlext.fused_sgd: params[", item->index, "] has ",
        numel, " elements, more than the CUDA kernel supports (",
        kMaxChunksPerLaunch * kChunkSize, ")");
    if (num_tensors == kMaxTensors || num_chunks + chunks > kMaxChunksPerLaunch) {
      launch();
    }
    const int t = num_tensors;
    args.out[t] = item->out.data_ptr<scalar_t>();
    args.p[t] = item->p.const_data_ptr<scalar_t>();
    args.g[t] = item->g.const_data_ptr<scalar_t>();
    args.lr[t] = item->lr.values.defined() ? item->lr.values.const_data_ptr<scalar_t>() : nullptr;
    // Converted on the host, as the CPU kernel does.
    args.scalar[t] = static_cast<opmath_t>(item->lr.scalar);
    args.numel[t] = numel;
    args.lr_block[t] = item->lr.block;
    args.lr_count[t] = item->lr.count;
    args.first_chunk[t] = static_cast<int32_t>(num_chunks);
    num_chunks += chunks;
    ++num_tensors;
  }
  if (num_tensors > 0) {
    launch();
  }
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
