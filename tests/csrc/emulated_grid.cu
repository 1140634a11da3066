// The CUDA kernel's per-thread work, run on the CPU over emulated grids (no GPU needed):
// for each launch that the real launch planner (plan_launches) makes, every block index and
// every thread index calls the same __host__ __device__ function the __global__ kernel calls
// (fused_sgd_thread). The results are compared with p - lr * g computed in double; guard
// elements around every buffer catch writes (and, through NaN inputs, reads) out of bounds,
// and a sentinel value catches elements that no thread wrote.
//
// Compiled by nvcc with torch's headers (tests/test_cuda_emulated.py), no torch library
// linked. Prints one line per case and "OK" at the end; exits 1 on the first mismatch.
#include "cuda/fused_sgd_kernel.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

namespace ck = mamlext::cuda_kernel;

namespace {

constexpr int64_t kGuard = 16;  // guard elements before and after every buffer

uint64_t rng_state = 0x9E3779B97F4A7C15ull;
double uniform() {  // in [-1, 1)
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return static_cast<double>(rng_state >> 11) / static_cast<double>(1ull << 52) - 1.0;
}

template <typename T>
const char* dtype_name();
template <>
const char* dtype_name<float>() { return "float32"; }
template <>
const char* dtype_name<double>() { return "float64"; }
template <>
const char* dtype_name<c10::Half>() { return "float16"; }
template <>
const char* dtype_name<c10::BFloat16>() { return "bfloat16"; }

template <typename T>
double epsilon() {  // unit roundoff of T
  if constexpr (std::is_same_v<T, c10::Half>) {
    return std::ldexp(1.0, -11);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return std::ldexp(1.0, -8);
  } else {
    return std::numeric_limits<T>::epsilon();
  }
}

// A buffer of n elements starting `offset` elements after a 16-byte aligned address, with
// kGuard guard elements on each side.
template <typename T>
struct Buffer {
  std::vector<T> storage;
  int64_t start;  // index of element 0 in storage
  int64_t n;
  Buffer(int64_t n, int64_t offset, T fill) : storage(n + 2 * kGuard + offset + 16, fill), n(n) {
    const auto base = reinterpret_cast<std::uintptr_t>(storage.data());
    const int64_t misalignment = static_cast<int64_t>(base % 16) / static_cast<int64_t>(sizeof(T));
    start = (16 / static_cast<int64_t>(sizeof(T)) - misalignment) % (16 / sizeof(T)) + kGuard +
            offset;
  }
  T* data() { return storage.data() + start; }
  T& operator[](int64_t i) { return storage[start + i]; }
};

// One tensor of a case: its rate layout and the offsets (in elements) of its p, g and lr.
struct Spec {
  int64_t numel;
  std::string rate;  // scalar | element | shared | per_task
  int64_t tasks = 1;
  int64_t offset = 0;  // of p, g and lr (out is freshly allocated: aligned)
};

template <typename T>
bool run_case(const std::string& name, const std::vector<Spec>& specs) {
  using opmath_t = at::opmath_type<T>;
  const T nan = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
  const T sentinel = static_cast<T>(1000.0f);  // exact in every dtype
  std::vector<Buffer<T>> outs, ps, gs, lrs;
  std::vector<ck::TensorRef<T>> refs;
  std::vector<double> scalars;
  outs.reserve(specs.size());
  ps.reserve(specs.size());
  gs.reserve(specs.size());
  lrs.reserve(specs.size());
  for (const Spec& s : specs) {
    outs.emplace_back(s.numel, 0, sentinel);
    ps.emplace_back(s.numel, s.offset, nan);
    gs.emplace_back(s.numel, s.offset, nan);
    int64_t block = 1, count = 1;
    if (s.rate == "scalar") {
      block = s.numel;
    } else if (s.rate == "element") {
      count = s.numel;
    } else if (s.rate == "shared") {  // Meta-SGD rates [*shape] shared by tasks: p [T, *shape]
      count = s.numel / s.tasks;
    } else {  // per_task: [T, 1, ..., 1]
      block = s.numel / s.tasks;
      count = s.tasks;
    }
    lrs.emplace_back(s.rate == "scalar" ? 0 : count, s.offset, nan);
    for (int64_t j = 0; j < s.numel; ++j) {
      ps.back()[j] = static_cast<T>(uniform());
      gs.back()[j] = static_cast<T>(uniform());
    }
    for (int64_t j = 0; j < lrs.back().n; ++j) {
      lrs.back()[j] = static_cast<T>(0.5 + 0.25 * uniform());
    }
    scalars.push_back(0.5 + 0.25 * uniform());
    refs.push_back(ck::TensorRef<T>{
        outs.back().data(), ps.back().data(), gs.back().data(),
        s.rate == "scalar" ? nullptr : lrs.back().data(),
        static_cast<opmath_t>(scalars.back()), s.numel, block, count});
  }
  int launches = 0;
  int64_t blocks_total = 0;
  const auto emulate = [&](const ck::FusedSgdArgs<T>& args, int64_t blocks) {
    ++launches;
    blocks_total += blocks;
    for (int64_t b = 0; b < blocks; ++b) {
      for (int t = 0; t < ck::kThreads; ++t) {
        ck::fused_sgd_thread(args, static_cast<int32_t>(b), t);
      }
    }
  };
  int64_t too_large = -1;
  if (!ck::plan_launches(refs.data(), static_cast<int64_t>(refs.size()), emulate, &too_large)) {
    std::printf("FAIL %s %s: the planner refused tensor %lld\n", name.c_str(), dtype_name<T>(),
                static_cast<long long>(too_large));
    return false;
  }
  const int64_t expected_launches =
      (static_cast<int64_t>(specs.size()) + ck::kMaxTensors - 1) / ck::kMaxTensors;
  if (launches != expected_launches) {
    std::printf("FAIL %s %s: %d launches, expected %lld\n", name.c_str(), dtype_name<T>(),
                launches, static_cast<long long>(expected_launches));
    return false;
  }
  for (size_t k = 0; k < specs.size(); ++k) {
    const ck::TensorRef<T>& r = refs[k];
    Buffer<T>& out = outs[k];
    for (int64_t j = -kGuard; j < r.numel + kGuard; ++j) {
      const double got = static_cast<double>(out[j]);
      if (j < 0 || j >= r.numel) {
        if (got != static_cast<double>(sentinel)) {
          std::printf("FAIL %s %s: tensor %zu, guard element %lld was written\n", name.c_str(),
                      dtype_name<T>(), k, static_cast<long long>(j));
          return false;
        }
        continue;
      }
      const double rate = r.lr == nullptr
          ? static_cast<double>(r.scalar)
          : static_cast<double>(r.lr[(j / r.lr_block) % r.lr_count]);
      const double p = static_cast<double>(r.p[j]), g = static_cast<double>(r.g[j]);
      const double want = static_cast<double>(static_cast<T>(p - rate * g));
      // one rounding in opmath and one to T, against one rounding of the exact value
      const double tolerance = 2 * epsilon<T>() * (std::fabs(p) + std::fabs(rate * g)) + 1e-30;
      if (!(std::fabs(got - want) <= tolerance)) {
        std::printf("FAIL %s %s: tensor %zu (numel %lld, rate %s, offset %lld) element %lld: "
                    "%.17g, expected %.17g\n", name.c_str(), dtype_name<T>(), k,
                    static_cast<long long>(r.numel), specs[k].rate.c_str(),
                    static_cast<long long>(specs[k].offset), static_cast<long long>(j), got, want);
        return false;
      }
    }
  }
  std::printf("ok %-28s %-8s %4zu tensors, %d launch(es), %lld blocks\n", name.c_str(),
              dtype_name<T>(), specs.size(), launches, static_cast<long long>(blocks_total));
  return true;
}

const char* const kRates[] = {"scalar", "element", "shared", "per_task"};

template <typename T>
bool run_all() {
  constexpr int64_t vec = ck::kVecBytes / sizeof(T);
  bool ok = true;
  // Chunk boundaries, with every rate form (4 tasks: numel a multiple of 4).
  for (const char* rate : kRates) {
    for (int64_t numel : {ck::kChunkSize - 4, ck::kChunkSize, ck::kChunkSize + 4,
                          2 * ck::kChunkSize + 4, 3 * ck::kChunkSize}) {
      ok &= run_case<T>(std::string("chunk ") + std::to_string(numel) + " " + rate,
                        {{numel, rate, 4, 0}});
    }
    // numel 65536 +- 1 (one task for the task layouts)
    for (int64_t numel : {ck::kChunkSize - 1, ck::kChunkSize + 1}) {
      ok &= run_case<T>(std::string("chunk ") + std::to_string(numel) + " " + rate,
                        {{numel, rate, 1, 0}});
    }
  }
  // Tails of 1 .. vec - 1 elements after whole vectors, and tiny tensors.
  for (const char* rate : kRates) {
    std::vector<Spec> specs;
    for (int64_t tail = 1; tail < vec; ++tail) {
      specs.push_back({tail, rate, 1, 0});
      specs.push_back({3 * vec + tail, rate, 1, 0});
      specs.push_back({2 * 1000 * vec + 2 * tail, rate, 2, 0});
    }
    ok &= run_case<T>(std::string("tails ") + rate, specs);
  }
  // Views offset by 1 .. 7 elements (misaligned p, g and lr), every rate form.
  for (const char* rate : kRates) {
    std::vector<Spec> specs;
    for (int64_t offset = 1; offset <= 7; ++offset) {
      specs.push_back({4 * (1000 + offset), rate, 4, offset});
      specs.push_back({ck::kChunkSize + 8 * offset, rate, 4, offset});
    }
    ok &= run_case<T>(std::string("offsets 1-7 ") + rate, specs);
  }
  // Many tensors: around the kMaxTensors (56) tensors of one launch.
  for (int64_t count : {55, 56, 57, 113}) {
    std::vector<Spec> specs;
    for (int64_t k = 0; k < count; ++k) {
      const int64_t tasks = 1 + k % 3;
      specs.push_back({tasks * (1 + static_cast<int64_t>(k * 37 % 300)), kRates[k % 4], tasks,
                       k % 8});
    }
    ok &= run_case<T>("many tensors " + std::to_string(count), specs);
  }
  return ok;
}

}  // namespace

int main() {
  const bool ok = run_all<float>() && run_all<double>() && run_all<c10::Half>() &&
                  run_all<c10::BFloat16>();
  std::printf(ok ? "OK\n" : "FAILED\n");
  return ok ? 0 : 1;
}
