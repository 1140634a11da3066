// CPU kernel of mamlext::fused_sgd: one parallel pass over every element of every
// tensor of the list (at::parallel_for over the concatenated index range), and the
// registration of the C++ autograd rule (autograd.h) for CPU tensors.
#include "../autograd.h"
#include "../fused_sgd.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace mamlext {
namespace {

struct Segment {
  at::Tensor out, p, g;
  LrLayout lr;
  int64_t begin;  // offset of this tensor in the concatenated index range
};

// The loops, inlined into one function per instruction set below (the compiler
// vectorises them for each).
template <typename scalar_t>
inline __attribute__((always_inline)) void update_range_impl(
    const Segment& s, int64_t lo, int64_t hi) {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* __restrict__ out = s.out.data_ptr<scalar_t>();
  const scalar_t* __restrict__ p = s.p.const_data_ptr<scalar_t>();
  const scalar_t* __restrict__ g = s.g.const_data_ptr<scalar_t>();
  const scalar_t* __restrict__ lr =
      s.lr.values.defined() ? s.lr.values.const_data_ptr<scalar_t>() : nullptr;
  const int64_t block = s.lr.block;
  const int64_t count = s.lr.count;
  if (lr != nullptr && block == 1) {
    // One rate per element, repeating every `count` elements (Meta-SGD, shared by tasks):
    // walk whole periods so the inner loop reads lr contiguously and vectorises.
    for (int64_t j = lo; j < hi;) {
      const int64_t base = j - j % count;
      const int64_t stop = std::min(hi, base + count);
      for (int64_t k = j; k < stop; ++k) {
        out[k] = static_cast<scalar_t>(
            static_cast<opmath_t>(p[k]) -
            static_cast<opmath_t>(lr[k - base]) * static_cast<opmath_t>(g[k]));
      }
      j = stop;
    }
    return;
  }
  // Walk lr blocks (one block for a scalar rate) so the innermost loop has a constant
  // rate and vectorises.
  for (int64_t j = lo; j < hi;) {
    const int64_t b = j / block;
    const int64_t stop = std::min(hi, (b + 1) * block);
    const opmath_t rate =
        lr ? static_cast<opmath_t>(lr[b % count]) : static_cast<opmath_t>(s.lr.scalar);
    for (int64_t k = j; k < stop; ++k) {
      out[k] = static_cast<scalar_t>(static_cast<opmath_t>(p[k]) - rate * static_cast<opmath_t>(g[k]));
    }
    j = stop;
  }
}

template <typename scalar_t>
void update_range_baseline(const Segment& s, int64_t lo, int64_t hi) {
  update_range_impl<scalar_t>(s, lo, hi);
}

// The extension is built without -march flags (a JIT or wheel build must run on any CPU of
// its architecture), which leaves x86-64 at SSE2: half the vector width of ATen's own
// AVX2 kernels, measured ~1.8x slower than torch._foreach_add on a cache-resident list.
// So x86-64 gets an AVX2 copy of the loops, chosen at run time. Without FMA on purpose:
// p - rate * g then rounds twice, as torchmeta's and a plain PyTorch loop's update do, so
// their results and ours are equal to the bit.
#if defined(__GNUC__) && defined(__x86_64__)
template <typename scalar_t>
__attribute__((target("avx2"))) void update_range_avx2(
    const Segment& s, int64_t lo, int64_t hi) {
  update_range_impl<scalar_t>(s, lo, hi);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

template <typename scalar_t>
void update_range(const Segment& s, int64_t lo, int64_t hi) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (cpu_has_avx2()) {
    update_range_avx2<scalar_t>(s, lo, hi);
    return;
  }
#endif
  update_range_baseline<scalar_t>(s, lo, hi);
}

std::vector<at::Tensor> fused_sgd_cpu(
    at::TensorList params,
    at::TensorList grads,
    const c10::List<std::optional<at::Tensor>>& lrs,
    at::ArrayRef<double> lr_scalars) {
  check_fused_sgd_inputs(params, grads, lrs, lr_scalars, c10::DeviceType::CPU);
  std::vector<at::Tensor> outs;
  std::vector<Segment> segments;
  outs.reserve(params.size());
  segments.reserve(params.size());
  int64_t total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor out = at::empty(params[i].sizes(), params[i].options());
    outs.push_back(out);
    if (out.numel() == 0) {
      continue;
    }
    segments.push_back(Segment{
        out, params[i].contiguous(), grads[i].contiguous(),
        lr_layout(lrs.get(i), lr_scalars[i], params[i]), total});
    total += out.numel();
  }
  constexpr int64_t kGrain = 1 << 15;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    // First segment that ends after `begin`.
    auto it = std::upper_bound(
        segments.begin(), segments.end(), begin,
        [](int64_t value, const Segment& s) { return value < s.begin + s.out.numel(); });
    for (; it != segments.end() && it->begin < end; ++it) {
      const Segment& s = *it;
      const int64_t lo = std::max(begin, s.begin) - s.begin;
      const int64_t hi = std::min(end, s.begin + s.out.numel()) - s.begin;
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, s.out.scalar_type(), "mamlext_fused_sgd_cpu",
          [&] { update_range<scalar_t>(s, lo, hi); });
    }
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, CPU, m) {
  m.impl("fused_sgd", &fused_sgd_cpu);
}

TORCH_LIBRARY_IMPL(mamlext, AutogradCPU, m) {
  m.impl("fused_sgd", &fused_sgd_autograd);
}

}  // namespace mamlext
