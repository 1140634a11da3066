// The CUDA kernel of mamlext::fused_sgd without ATen tensors:  out_i = p_i - lr_i * g_i  for
// every tensor of a list, as a multi-tensor apply (in the spirit of apex's
// multi_tensor_apply.cuh). Everything a thread does is a __host__ __device__ function, and the
// launch plan is plain host code, so that tests/csrc/emulated_grid.cu runs them on the CPU
// over every block and thread index of a real launch (nvcc compiles host code without a GPU);
// fused_sgd.cu wraps them for ATen tensors.
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
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace mamlext {
namespace cuda_kernel {

constexpr int64_t kChunkSize = 1 << 16;  // elements per chunk, i.e. per thread block
constexpr int kThreads = 512;            // threads per block
constexpr int kVecBytes = 16;            // bytes per operand a thread moves per vector step
constexpr int kMaxTensors = 56;          // tensors per launch (FusedSgdArgs < 4 KB)
// Blocks per launch: gridDim.x may not exceed 2^31 - 1, and first_chunk is int32.
constexpr int64_t kMaxChunksPerLaunch = std::numeric_limits<int32_t>::max();

// Chunk starts keep a tensor's 16-byte alignment for every dtype (2 bytes: the smallest).
static_assert(kChunkSize * 2 % kVecBytes == 0, "chunk starts must keep 16-byte alignment");

// One non-empty contiguous tensor of the list, as the kernel reads it.
template <typename scalar_t>
struct TensorRef {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* out;       // the new tensor, written
  const scalar_t* p;   // the parameters
  const scalar_t* g;   // the gradients
  const scalar_t* lr;  // nullptr: every element uses `scalar`; else element j uses
                       // lr[(j / lr_block) % lr_count]
  opmath_t scalar;
  int64_t numel;     // > 0
  int64_t lr_block;  // >= 1
  int64_t lr_count;  // >= 1
};

// The kernel argument of one launch. Entry t (t < num_tensors) of each array describes the
// t-th tensor of the launch (the fields of TensorRef).
template <typename scalar_t>
struct FusedSgdArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* out[kMaxTensors];
  const scalar_t* p[kMaxTensors];
  const scalar_t* g[kMaxTensors];
  const scalar_t* lr[kMaxTensors];
  opmath_t scalar[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t lr_block[kMaxTensors];
  int64_t lr_count[kMaxTensors];
  // Blocks first_chunk[t] <= b < first_chunk[t + 1] update tensor t: block b its elements
  // [c * kChunkSize, min((c + 1) * kChunkSize, numel[t])) with c = b - first_chunk[t].
  // first_chunk[num_tensors] is the number of blocks of the launch.
  int32_t first_chunk[kMaxTensors + 1];
  int32_t num_tensors;
};
static_assert(
    sizeof(FusedSgdArgs<double>) <= 4096 && sizeof(FusedSgdArgs<float>) <= 4096,
    "the kernel argument must stay under the 4 KB limit");

// p - rate * g as one fused multiply-add, rounded once to nearest (std::fma on the host
// rounds the same way).
C10_HOST_DEVICE inline float sgd_step(float p, float rate, float g) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(-rate, g, p);
#else
  return std::fma(-rate, g, p);
#endif
}

C10_HOST_DEVICE inline double sgd_step(double p, double rate, double g) {
#ifdef __CUDA_ARCH__
  return __fma_rn(-rate, g, p);
#else
  return std::fma(-rate, g, p);
#endif
}

// kN elements of type T, loaded and stored as one aligned access.
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Vec {
  T v[kN];
};

template <typename T>
C10_HOST_DEVICE inline bool is_vec_aligned(const T* ptr) {
  return reinterpret_cast<std::uintptr_t>(ptr) % kVecBytes == 0;
}

// j / block for non-negative operands, in 32 bits when both fit (several times cheaper).
C10_HOST_DEVICE inline int64_t div_nonneg(int64_t j, int64_t block) {
  if (((j | block) >> 32) == 0) {
    return static_cast<uint32_t>(j) / static_cast<uint32_t>(block);
  }
  return j / block;
}

// The learning rate of element i of a chunk (i: index within the chunk), three layouts.
// at(i) gives one rate; at_vec(i, r) the rates of elements i .. i + kN - 1, where i is a
// multiple of kN; vec_ok() says whether at_vec may be used (alignment).

// A scalar: one rate for the whole tensor.
template <typename opmath_t>
struct ScalarRate {
  opmath_t value;
  C10_HOST_DEVICE bool vec_ok() const { return true; }
  C10_HOST_DEVICE opmath_t at(int /*i*/) const { return value; }
  template <int kN>
  C10_HOST_DEVICE void at_vec(int /*i*/, opmath_t (&r)[kN]) const {
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
  C10_HOST_DEVICE bool vec_ok() const { return is_vec_aligned(lr); }
  C10_HOST_DEVICE opmath_t at(int i) const { return static_cast<opmath_t>(lr[i]); }
  template <int kN>
  C10_HOST_DEVICE void at_vec(int i, opmath_t (&r)[kN]) const {
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
  C10_HOST_DEVICE bool vec_ok() const { return true; }
  C10_HOST_DEVICE opmath_t at(int i) const {
    return static_cast<opmath_t>(lr[div_nonneg(begin + i, block) % count]);
  }
  template <int kN>
  C10_HOST_DEVICE void at_vec(int i, opmath_t (&r)[kN]) const {
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

// Thread `thread` (of kThreads) of the block that owns the chunk: out[i] = p[i] - rate(i) * g[i]
// for its share of 0 <= i < len. out, p and g point at the chunk's first element.
template <typename scalar_t, typename Rate>
C10_HOST_DEVICE inline void update_chunk(
    scalar_t* __restrict__ out,
    const scalar_t* __restrict__ p,
    const scalar_t* __restrict__ g,
    int len,
    const Rate& rate,
    int thread) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  using V = Vec<scalar_t, kVec>;
  static_assert(sizeof(V) == kVecBytes, "one vector access per operand");

  int vec_end = 0;  // elements [0, vec_end) are done by the vector loop
  if (is_vec_aligned(out) && is_vec_aligned(p) && is_vec_aligned(g) && rate.vec_ok()) {
    vec_end = len - len % kVec;
    // i is a multiple of kVec, so i < vec_end implies i + kVec <= vec_end.
    for (int i = thread * kVec; i < vec_end; i += kThreads * kVec) {
      const V pv = *reinterpret_cast<const V*>(p + i);
      const V gv = *reinterpret_cast<const V*>(g + i);
      opmath_t r[kVec];
      rate.template at_vec<kVec>(i, r);
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
  for (int i = vec_end + thread; i < len; i += kThreads) {
    out[i] = static_cast<scalar_t>(
        sgd_step(static_cast<opmath_t>(p[i]), rate.at(i), static_cast<opmath_t>(g[i])));
  }
}

// The whole work of thread `thread` of block `block` of a launch described by `args`.
template <typename scalar_t>
C10_HOST_DEVICE inline void fused_sgd_thread(
    const FusedSgdArgs<scalar_t>& args, int32_t block, int thread) {
  // This block's tensor: the last t with first_chunk[t] <= block. first_chunk is strictly
  // increasing (every tensor has >= 1 chunk) and first_chunk[0] == 0.
  int lo = 0;
  int hi = args.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (args.first_chunk[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int t = lo;

  const int64_t begin = static_cast<int64_t>(block - args.first_chunk[t]) * kChunkSize;
  const int64_t remaining = args.numel[t] - begin;  // > 0
  const int len = static_cast<int>(remaining < kChunkSize ? remaining : kChunkSize);
  scalar_t* out = args.out[t] + begin;
  const scalar_t* p = args.p[t] + begin;
  const scalar_t* g = args.g[t] + begin;
  const scalar_t* lr = args.lr[t];
  // The branch is uniform over the block.
  if (lr == nullptr) {
    update_chunk(out, p, g, len, ScalarRate<at::opmath_type<scalar_t>>{args.scalar[t]}, thread);
  } else if (args.lr_block[t] == 1 && args.lr_count[t] == args.numel[t]) {
    update_chunk(out, p, g, len, ElementwiseRate<scalar_t>{lr + begin}, thread);
  } else {
    update_chunk(
        out, p, g, len, BlockedRate<scalar_t>{lr, begin, args.lr_block[t], args.lr_count[t]},
        thread);
  }
}

// Packs `count` tensors (all of dtype scalar_t) into as few launches as FusedSgdArgs
// allows and calls launch(args, blocks) for each, in order. Returns false, packing nothing,
// if tensor `*too_large` alone needs more than kMaxChunksPerLaunch blocks.
template <typename scalar_t, typename Launch>
bool plan_launches(
    const TensorRef<scalar_t>* tensors, int64_t count, Launch&& launch, int64_t* too_large) {
  for (int64_t k = 0; k < count; ++k) {
    if ((tensors[k].numel + kChunkSize - 1) / kChunkSize > kMaxChunksPerLaunch) {
      *too_large = k;
      return false;
    }
  }
  FusedSgdArgs<scalar_t> args{};
  int num_tensors = 0;
  int64_t num_chunks = 0;
  const auto flush = [&] {
    args.first_chunk[num_tensors] = static_cast<int32_t>(num_chunks);
    args.num_tensors = num_tensors;
    launch(args, num_chunks);
    num_tensors = 0;
    num_chunks = 0;
  };
  for (int64_t k = 0; k < count; ++k) {
    const TensorRef<scalar_t>& tensor = tensors[k];
    const int64_t chunks = (tensor.numel + kChunkSize - 1) / kChunkSize;
    if (num_tensors == kMaxTensors || num_chunks + chunks > kMaxChunksPerLaunch) {
      flush();
    }
    const int t = num_tensors;
    args.out[t] = tensor.out;
    args.p[t] = tensor.p;
    args.g[t] = tensor.g;
    args.lr[t] = tensor.lr;
    args.scalar[t] = tensor.scalar;
    args.numel[t] = tensor.numel;
    args.lr_block[t] = tensor.lr_block;
    args.lr_count[t] = tensor.lr_count;
    args.first_chunk[t] = static_cast<int32_t>(num_chunks);
    num_chunks += chunks;
    ++num_tensors;
  }
  if (num_tensors > 0) {
    flush();
  }
  return true;
}

#ifdef __CUDACC__
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) fused_sgd_kernel(const FusedSgdArgs<scalar_t> args) {
  fused_sgd_thread(args, static_cast<int32_t>(blockIdx.x), static_cast<int>(threadIdx.x));
}
#endif

}  // namespace cuda_kernel
}  // namespace mamlext
