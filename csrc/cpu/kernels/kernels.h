// The CPU kernel primitives every norm op is built from, as a table of
// function pointers. The table is compiled once per SIMD capability
// (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp) and one is
// chosen at run time (dispatch.cpp), as ATen does with CPU_CAPABILITY.
//
// The primitives work on raw pointers, never on tensors: threading, shapes
// and layouts are decided by the op files in csrc/cpu/, so the
// capability-specific objects include no ATen header.
//
// Two layouts cover every op:
//  - spans: `count` runs of `len` contiguous elements, run j at
//    x + j * stride, with scalar constants (NCHW: one channel across the
//    batch, one group, or one plane);
//  - rows: `rows` x C row-major blocks (channels_last, and NCHW with one
//    spatial element); constants are per channel.
#pragma once

#include <cstdint>
#include <utility>  // std::index_sequence, for kernels_impl.h

namespace normops {
namespace cpu {

// Storage types of reduced-precision inputs, bit-compatible with
// c10::BFloat16 and c10::Half. Plain bits, converted with integer and float
// arithmetic that vectorises (GCC converts _Float16 one element at a time),
// or for float16 with F16C where the build has it (kernels_impl.h).
struct bf16_t {
  uint16_t bits;
};
struct half_t {
  uint16_t bits;
};

// Accumulation type: double for double, float otherwise.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

constexpr int kNumActs = 3;  // normops::Act

// Input row (or column) of output row ho at tap kh of a 3x3 convolution with
// padding 1, or -1 when it is padding.
inline int64_t tap_row(int64_t ho, int kh, int64_t H, int64_t stride) {
  const int64_t hi = ho * stride - 1 + kh;
  return hi >= 0 && hi < H ? hi : -1;
}

template <typename T>
struct Kernels {
  using A = acc_t<T>;

  // Moments of all the elements of a span set, blocked two-pass; prefetches
  // the start of `next`, a span of the same shape (or nullptr).
  void (*span_moments)(const T* x, int64_t len, int64_t stride, int64_t count, const T* next,
                       A* mean, A* m2);
  // Moments of each column of a rows x C block (mean[c], m2[c]): one pass
  // over blocks of block_rows rows, each shifted by its first row, Chan-merged.
  // With a residual array, the mean comes in two parts, mean[c] (rounded)
  // and residual[c] (the rest), for merge_columns. scratch: 3*C.
  void (*column_moments)(const T* x, int64_t rows, int64_t C, int64_t block_rows, A* mean,
                         A* residual, A* m2, A* scratch);
  // Chan-merge column moments (in two parts) of a block of count_b rows into
  // accumulators holding count_a rows; a's mean part stays, its residual
  // takes the change: merged at the scale of the spread, not of the mean.
  void (*merge_columns)(const A* mean, A* residual, A* m2, A count_a, const A* mean_b,
                        const A* residual_b, const A* m2_b, A count_b, int64_t C);

  // y = act((x - mean) * scale + bias). Centring first keeps the result
  // accurate for data with a large mean.
  void (*span_affine[kNumActs])(const T* x, T* y, int64_t len, int64_t stride, int64_t count,
                                A mean, A scale, A bias);
  // The same over `planes` contiguous planes of len values, plane j with
  // mean[j], scale[j], bias[j]. Here and in row_affine, a null mean is the
  // folded form act(x * scale + bias) (see fold_shifts, channel_norm.h).
  void (*plane_affine[kNumActs])(const T* x, T* y, int64_t len, int64_t planes, const A* mean,
                                 const A* scale, const A* bias);
  void (*row_affine[kNumActs])(const T* x, T* y, int64_t rows, int64_t C, const A* mean,
                               const A* scale, const A* bias);

  // With g = dy masked by the activation's gradient at the pre-activation
  // z = (x - mean) * scale + bias: sum_dy = sum(g) and sum_dy_xmu =
  // sum(g * (x - mean)), over a span set.
  void (*span_grad_sums[kNumActs])(const T* dy, const T* x, int64_t len, int64_t stride,
                                   int64_t count, A mean, A scale, A bias, A* sum_dy,
                                   A* sum_dy_xmu);
  // The same without activation over `planes` contiguous planes of len values
  // sharing one mean (a group of group norm), per plane: sum_dy[j],
  // sum_dy_xmu[j].
  void (*plane_grad_sums)(const T* dy, const T* x, int64_t len, int64_t planes, A mean,
                          A* sum_dy, A* sum_dy_xmu);
  // The same per channel of a rows x C block, over cache blocks of block_rows
  // rows, added (+=) into double accumulators. scratch: 2*C.
  void (*row_grad_sums[kNumActs])(const T* dy, const T* x, int64_t rows, int64_t C,
                                  int64_t block_rows, const A* mean, const A* scale,
                                  const A* bias, double* sum_dy, double* sum_dy_xmu,
                                  A* scratch);

  // dx = a * g + b * (x - m) + c, g as above with mean = m.
  void (*span_grad_input[kNumActs])(const T* dy, const T* x, T* dx, int64_t len,
                                    int64_t stride, int64_t count, A a, A b, A m, A c,
                                    A scale, A bias);
  // The same over contiguous planes, plane j with the constants [j].
  void (*plane_grad_input[kNumActs])(const T* dy, const T* x, T* dx, int64_t len,
                                     int64_t planes, const A* a, const A* b, const A* m,
                                     const A* c, const A* scale, const A* bias);
  void (*row_grad_input[kNumActs])(const T* dy, const T* x, T* dx, int64_t rows, int64_t C,
                                   const A* a, const A* b, const A* m, const A* c,
                                   const A* scale, const A* bias);

  // Layer norm over rows of D contiguous elements: y = (x - mean) * rstd *
  // gamma + beta, with mean[r], rstd[r] written per row.
  void (*layer_norm_rows)(const T* x, T* y, int64_t rows, int64_t D, const A* gamma,
                          const A* beta, A eps, A* mean, A* rstd);
  // Its backward: dx (when non-null) and, when non-null, dgamma[j] +=
  // dy * xhat and dbeta[j] += dy accumulated over the rows.
  void (*layer_norm_backward_rows)(const T* dy, const T* x, T* dx, int64_t rows, int64_t D,
                                   const A* mean, const A* rstd, const A* gamma, A* dgamma,
                                   A* dbeta);

  // Inverted residual (eval) stages, on row-major A buffers whose channel
  // counts are multiples of gemm_cols, one vector (zero weights and biases
  // in the padding, so padded channels stay 0).
  int64_t gemm_cols;
  // c (M x N, row stride N) = act(a (M x K, row stride lda) * wt (K x N,
  // row stride ldw) + bias).
  void (*gemm_bias_act[kNumActs])(const A* a, int64_t M, int64_t K, int64_t lda, const A* wt,
                                  int64_t ldw, int64_t N, const A* bias, A* c);
  // One output row of a 3x3 depthwise convolution with padding 1:
  // out[wo][c] = act(bias[c] + sum w[(kh*3+kw)*ldw + c] * rows[kh][wo*stride-1+kw][c]),
  // rows[kh] (W x C) null where the row is padding; out is Wo x C.
  void (*depthwise3x3_row[kNumActs])(const A* const* rows, int64_t W, int64_t Wo,
                                     int64_t stride, int64_t C, const A* w, int64_t ldw,
                                     const A* bias, A* out);

  // Depthwise 3x3 convolution for training (padding 1, stride 1 or 2, no
  // bias; Ho = (H - 1) / stride + 1, likewise Wo). NCHW, one plane: the
  // output (Ho x Wo) with weights w[9]; the input gradient (H x W); the
  // weight gradient added to dw[9].
  void (*depthwise_plane)(const A* x, int64_t H, int64_t W, int64_t stride, const A* w, A* y);
  void (*depthwise_plane_grad_input)(const A* dy, int64_t H, int64_t W, int64_t stride,
                                     const A* w, A* dx);
  void (*depthwise_plane_grad_weight)(const A* dy, const A* x, int64_t H, int64_t W,
                                      int64_t stride, double* dw);
  // Channels_last, weights wt[9 x C], an image W pixels wide (H rows):
  // one output row y (Wo x C) from the input rows of taps kh (rows[kh], W x
  // C; null where the row is padding, see tap_row); the input gradient's
  // rows [hi0, hi1) of one image; the weight gradient of one output row dy
  // (Wo x C) added to dw[9 x C] (row: 9 x C scratch). Each prefetches
  // `prefetch_len` values from `prefetch` (null: none) as it goes: what the
  // caller reads next, fetched while this is computed from cache.
  void (*depthwise_row)(const A* const* rows, int64_t W, int64_t C, int64_t stride,
                        const A* wt, A* y, const A* prefetch, int64_t prefetch_len);
  void (*depthwise_rows_grad_input)(const A* dy, int64_t H, int64_t W, int64_t C,
                                    int64_t stride, const A* wt, int64_t hi0, int64_t hi1,
                                    A* dx, const A* prefetch, int64_t prefetch_len);
  void (*depthwise_row_grad_weight)(const A* dy, const A* const* rows, int64_t W, int64_t C,
                                    int64_t stride, A* row, double* dw, const A* prefetch,
                                    int64_t prefetch_len);

  // dst[0, n) = src[0, n) with non-temporal stores for the whole aligned
  // vectors (plain ones at the unaligned ends): an output streamed out of a
  // buffer in cache costs memory no read of the lines it overwrites
  // (common.h, write_output). Unfenced: see StreamFence.
  void (*stream_out)(T* dst, const T* src, int64_t n);
};

namespace cap_default {
template <typename T>
const Kernels<T>& kernel_table();
}
namespace cap_avx2 {
template <typename T>
const Kernels<T>& kernel_table();
}
namespace cap_avx512 {
template <typename T>
const Kernels<T>& kernel_table();
}

enum class Capability { Default = 0, AVX2 = 1, AVX512 = 2 };

// The capability in use: the best the CPU supports, or a lower one forced
// with NORMOPS_CPU_CAPABILITY=default|avx2|avx512 (read once).
Capability cpu_capability();
const char* cpu_capability_name();

template <typename T>
const Kernels<T>& kernels();

}  // namespace cpu
}  // namespace normops
