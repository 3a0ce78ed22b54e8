// Helpers shared by the CPU op files: dtype dispatch onto the kernel storage
// types, chunked parallel loops and cache-block sizes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <unistd.h>
#if defined(__x86_64__)
#include <xmmintrin.h>  // _mm_sfence (SSE: every x86-64 CPU)
#endif

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
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
    const int64_t stride = t.stride(0), n = t.numel();
    if (stride == 1) {  // vectorised
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(p[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(p[i * stride]);
    }
  });
}

// Whether two CPU tensors of one dtype and shape hold the same values: their
// bytes when both are contiguous (memcmp reads ~4x faster than torch.equal
// compares), else torch.equal. For caches of values derived from weights that
// can change without a version bump (writes through .data, fused optimizers).
inline bool same_values(const Tensor& a, const Tensor& b) {
  if (!a.device().is_cpu() || !b.device().is_cpu() || a.scalar_type() != b.scalar_type() ||
      a.sizes() != b.sizes())
    return false;
  if (!a.is_contiguous() || !b.is_contiguous()) return a.equal(b);
  return std::memcmp(a.const_data_ptr(), b.const_data_ptr(), a.nbytes()) == 0;
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

// NORMOPS_STREAMING_STORES: "0" never streams outputs, "1" streams every
// output and run (for the tests), anything else chooses by size. Read once.
enum class Streaming { BySize, Never, Always };

inline Streaming streaming_mode() {
  static const Streaming mode = [] {
    const char* env = std::getenv("NORMOPS_STREAMING_STORES");
    if (env == nullptr || *env == '\0') return Streaming::BySize;
    if (std::strcmp(env, "0") == 0) return Streaming::Never;
    if (std::strcmp(env, "1") == 0) return Streaming::Always;
    TORCH_WARN("NORMOPS_STREAMING_STORES='", env, "' is not 0 or 1; choosing by size");
    return Streaming::BySize;
  }();
  return mode;
}

// The last-level cache shared by this CPU's cores: cpu0's level-3 cache as
// Linux reports it, else sysconf's (which, in the VM measured here, gave
// 320 MB for a 32 MB L3: the host's), else 32 MB.
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    for (int index = 0; index < 8; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
      int level = 0;
      long size = 0;
      char unit = 0;
      FILE* f = std::fopen((dir + "/level").c_str(), "r");
      if (f == nullptr) break;
      const bool has_level = std::fscanf(f, "%d", &level) == 1;
      std::fclose(f);
      if (!has_level || level != 3 || (f = std::fopen((dir + "/size").c_str(), "r")) == nullptr)
        continue;
      const int read = std::fscanf(f, "%ld%c", &size, &unit);
      std::fclose(f);
      if (read >= 1 && size > 0)
        return int64_t(size) * (unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : 1);
    }
#ifdef _SC_LEVEL3_CACHE_SIZE
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (l3 > 0) return int64_t(l3);
#endif
    return int64_t(32) << 20;
  }();
  return bytes;
}

// Whether `output` is written with non-temporal stores: when it and the
// input it is computed from, as large, do not fit in the last-level cache
// together. A plain store first reads the line it overwrites (read for
// ownership), a third of an elementwise pass's memory traffic, and such an
// output leaves the cache before the next op reads it anyway. A smaller
// output is better left in cache: reused allocations are then written
// there, where non-temporal stores would first evict them. Measured here,
// 2 threads, fwd+bwd x ATen: layer norm 4096x768 (12.6 MB) 0.97-1.01x plain,
// 0.87x streamed; 4096x4096 (64 MB) 1.04-1.06x plain, 1.12-1.16x streamed;
// batch norm NCHW 32x256x56x56 (103 MB) forward 8.6-9.4 ms plain, 6.6-7.8
// ms streamed. Outputs of 16-32 MB (half the cache to all of it), which
// the output's size alone left plain, two runs each: batch norm NCHW
// 32x256x28x28 1.75-1.81x plain, 2.18-2.23x streamed; 32x192x28x28
// 1.70-1.75x, 2.05-2.13x; 32x64x56x56 1.79-1.86x, 1.97-2.06x; 32x1024x14x14
// 1.60-1.62x, 1.45-1.60x; with ReLU6 32x192x28x28 2.15-2.26x, 2.65-2.67x;
// group norm NCHW 2x256x100x152 1.12-1.17x, 1.19-1.25x; layer norm
// 8192x1024 0.93-1.05x, 1.08x; channels_last within the noise.
inline bool stream_output(const Tensor& output) {
  switch (streaming_mode()) {
    case Streaming::Never: return false;
    case Streaming::Always: return true;
    default: return 2 * int64_t(output.nbytes()) > last_level_cache_bytes();
  }
}

// f(b, e, s) for the pieces [b, e) of [begin, end) cut at the multiples of
// `segment` (samples, planes), s = b / segment: where the constants change.
template <typename F>
void for_each_segment(int64_t begin, int64_t end, int64_t segment, const F& f) {
  for (int64_t b = begin; b < end;) {
    const int64_t s = b / segment, e = std::min(end, (s + 1) * segment);
    f(b, e, s);
    b = e;
  }
}

constexpr int64_t kStreamBufferBytes = 64 * 1024;

// The calling thread's buffer for write_output.
inline char* stream_buffer() {
  alignas(64) static thread_local char buffer[kStreamBufferBytes];
  return buffer;
}

// Declared at the start of a parallel task that writes with write_output:
// when the task ends, a store fence makes its non-temporal stores visible to
// the other threads. Once per task, not per piece: a fence waits for the
// stores to reach memory.
struct StreamFence {
  bool active;
  ~StreamFence() {
#if defined(__x86_64__)
    if (active) _mm_sfence();
#endif
  }
};

// Whether write_output streams runs of `len` values, in units of `unit`,
// through its buffer; if not, it writes them in place, one run at a time.
template <typename T>
bool streams_through_buffer(bool stream, int64_t len, int64_t unit) {
  constexpr int64_t kMinRunBytes = 1024;
  return stream && unit * int64_t(sizeof(T)) <= kStreamBufferBytes &&
         (len * int64_t(sizeof(T)) >= kMinRunBytes || streaming_mode() == Streaming::Always);
}

// Writes an output of `count` runs of `len` values, run j at out + j * stride,
// with produce(dst, offset, n) computing the n values at out + offset into
// dst[0, n). With `stream`, through a per-thread buffer in L1, in pieces of
// whole units of `unit` values (rows), copied out by stream_out; otherwise,
// and for runs too short to stream, straight into out.
//
// Pieces of 4 KB: while a piece is copied out the thread issues no loads, and
// a layer-norm row of 256 to 1024 values, which the hardware prefetcher alone
// brings in, then waits on memory. Measured with 16 KB pieces against 4 KB
// (op level, 2 threads, 640 MB of rotated inputs, interleaved in one
// process): layer norm 32768x256 forward 2.72 -> 1.65 ms, backward 3.95 ->
// 2.63 ms (2.87 plain); 8192x1024 forward 2.24 -> 1.83 ms; batch norm NCHW
// 32x256x56x56 and 32x64x112x112 forward and backward, and layer norm
// 2048x4096, the same or 2-7% faster.
template <typename T, typename F>
void write_output(const Kernels<T>& k, bool stream, T* out, int64_t len, int64_t stride,
                  int64_t count, int64_t unit, const F& produce) {
  constexpr int64_t kPieceBytes = 4 * 1024;
  const int64_t unit_bytes = unit * int64_t(sizeof(T));
  const bool buffered = streams_through_buffer<T>(stream, len, unit);
  T* buf = buffered ? reinterpret_cast<T*>(stream_buffer()) : nullptr;
  const int64_t piece = std::max<int64_t>(1, kPieceBytes / std::max<int64_t>(1, unit_bytes)) * unit;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t run = j * stride;
    if (!buffered) {
      produce(out + run, run, len);
      continue;
    }
    for (int64_t b = 0; b < len; b += piece) {
      const int64_t n = std::min(piece, len - b);
      produce(buf, run + b, n);
      k.stream_out(out + run + b, buf, n);
    }
  }
}

}  // namespace cpu
}  // namespace normops
