// Helpers shared by the CPU op files: dtype dispatch onto the kernel storage
// types, chunked parallel loops and cache-block sizes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../channel_view.h"
#include "../checks.h"
#include "../moments.h"
#include "kernels/kernels.h"

namespace normops {
namespace cpu {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the kernel storage type of `dtype`.
template <typename F>
void dispatch_floating(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(Tag<float>{});
    case at::kDouble: return f(Tag<double>{});
    case at::kBFloat16: return f(Tag<bf16_t>{});
    case at::kHalf: return f(Tag<half_t>{});
    default:
      TORCH_CHECK(false, op, ": expected a floating point input (float32, float64, bfloat16 or ",
                  "float16), but got ", dtype);
  }
}

template <typename T>
T* ptr(const Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// out[i] = t[i] for a vector t of any floating dtype (and any stride).
inline void read_as_double(const Tensor& t, double* out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "normops", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    const int64_t stride = t.stride(0);
    for (int64_t i = 0; i < t.numel(); ++i) out[i] = static_cast<double>(p[i * stride]);
  });
}

// A per-channel parameter in double, `fill` repeated when absent.
inline std::vector<double> param_as_double(const OptTensor& p, int64_t C, double fill) {
  std::vector<double> out(static_cast<size_t>(C), fill);
  if (present(p)) read_as_double(*p, out.data());
  return out;
}

// A new tensor of `sizes` and `opts` (any floating dtype) holding values.
inline Tensor from_double(const double* values, at::IntArrayRef sizes,
                          const at::TensorOptions& opts) {
  Tensor t = at::empty(sizes, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "normops", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<scalar_t>(values[i]);
  });
  return t;
}

// A parameter's gradient from its values in double: the parameter's dtype
// (the input's when it is absent), 0 elements when not wanted.
inline Tensor param_grad_from(const Tensor& input, bool wanted, const OptTensor& param,
                              const std::vector<double>& values) {
  const auto opts = input.options().dtype(present(param) ? param->scalar_type()
                                                         : input.scalar_type());
  if (!wanted) return at::empty({0}, opts);
  return from_double(values.data(), {static_cast<int64_t>(values.size())}, opts);
}

// Units of work per parallel task for units of `elems` elements: at least
// ATen's grain of 32768 elements, so that a small input runs on the calling
// thread instead of waking the others (tens of microseconds when they sleep).
inline int64_t grain_for(int64_t elems) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elems));
}

// Number of parallel chunks for `total` units of work with at least
// `min_per_chunk` units each, at most one per thread.
inline int64_t num_chunks(int64_t total, int64_t min_per_chunk) {
  const int64_t by_size = total / (min_per_chunk > 0 ? min_per_chunk : 1);
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, std::min<int64_t>(by_size, threads));
}

// Runs f(chunk, begin, end) for `chunks` near-equal ranges of [0, total) in
// parallel. Per-chunk partial results make reductions deterministic for a
// given chunk count, with no atomics.
template <typename F>
void for_each_chunk(int64_t total, int64_t chunks, const F& f) {
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c, total * c / chunks, total * (c + 1) / chunks);
  });
}

// Rows per cache block for row-layout reductions over C channels: about
// 64 KB; at most 128 rows, which keeps float block sums accurate; at least
// 32, so that merging a block's C partials stays small beside reducing it
// (wide C: 32 rows of 2048 channels is 256 KB, still in L2).
inline int64_t block_rows(int64_t C, int64_t elem_size) {
  constexpr int64_t kBlockBytes = 64 * 1024;
  const int64_t rows = kBlockBytes / std::max<int64_t>(1, C * elem_size);
  return std::max<int64_t>(32, std::min<int64_t>(rows, 128));
}


}  // namespace cpu
}  // namespace normops
