// Shared statistics math for the CPU and CUDA backends.
//
// Statistics are kept as (count, mean, M2) triples and merged with Chan's
// pairwise formula; each block of data is reduced with an exact two-pass
// (mean first, then centred squares) while it is hot in cache. Never
// E[x^2] - E[x]^2: it cancels catastrophically for data with a large mean.
#pragma once

#include <cmath>
#include <cstdint>

// Always inlined on the host: the CPU kernels are compiled once per SIMD
// capability, and an out-of-line copy of a shared helper built for AVX-512
// could otherwise be picked by the linker for the portable path.
#if defined(__CUDACC__)
#define NORMOPS_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define NORMOPS_HD inline __attribute__((always_inline))
#else
#define NORMOPS_HD inline
#endif

namespace normops {

// Activation fused after the affine step. The integer values are part of the
// op schemas (`int activation`), shared with Python.
enum class Act : int64_t { None = 0, ReLU = 1, ReLU6 = 2 };

template <typename A>
struct Moments {
  A count;
  A mean;
  A m2;  // sum of squared deviations from the mean
};

// Whether v is finite, written so that the vectoriser keeps it (v - v is
// NaN for +-inf and NaN).
template <typename A>
NORMOPS_HD bool is_finite(A v) {
  return v - v == A(0);
}

// The mean of two samples merged, sample b weighing wb: mean + delta * wb
// (delta = mean_b - mean), accurate for close means. Where delta is not
// finite (an infinite mean, or means that overflow apart) the weighted sum
// instead: +-inf (NaN for +inf with -inf), as the sum over the samples that
// torch's batch statistics divide gives; mean + delta * wb would be NaN.
template <typename A>
NORMOPS_HD A merged_mean(A mean, A mean_b, A delta, A wb) {
  return is_finite(delta) ? mean + delta * wb : mean * (A(1) - wb) + mean_b * wb;
}

// Chan, Golub & LeVeque: merge the moments of two disjoint samples. Into an
// empty one it copies: delta^2 * 0 would be NaN once |mean| > ~1.8e19 in
// float32.
template <typename A>
NORMOPS_HD void chan_merge(A& count, A& mean, A& m2, A count_b, A mean_b, A m2_b) {
  const A n = count + count_b;
  if (count_b == A(0)) return;
  if (count == A(0)) {
    count = count_b;
    mean = mean_b;
    m2 = m2_b;
    return;
  }
  const A delta = mean_b - mean;
  const A wb = count_b / n;
  mean = merged_mean(mean, mean_b, delta, wb);
  m2 += m2_b + delta * delta * count * wb;
  count = n;
}

template <typename A>
NORMOPS_HD void chan_merge(Moments<A>& a, const Moments<A>& b) {
  chan_merge(a.count, a.mean, a.m2, b.count, b.mean, b.m2);
}

// Welford's update of (count, mean, M2) with one value.
template <typename A>
NORMOPS_HD void welford_add(A& count, A& mean, A& m2, A v) {
  count += A(1);
  const A d = v - mean;
  mean = merged_mean(mean, v, d, A(1) / count);
  m2 += d * (v - mean);
}

// The coefficient of (x - mean) in the input gradient of a normalisation,
// -scale * rstd^2 * mean_dy_xmu (scale: rstd times the weight, or rstd with
// the weight inside mean_dy_xmu). One rstd at a time: rstd^2 alone underflows
// double at a spread of 1e105, which dropped the term.
template <typename A>
NORMOPS_HD A centred_coefficient(A scale, A rstd, A mean_dy_xmu) {
  return -scale * (rstd * (rstd * mean_dy_xmu));
}

// Biased variance, as torch.nn normalises with; a zero count gives 0.
template <typename A>
NORMOPS_HD A biased_var(const Moments<A>& m) {
  return m.count > A(0) ? m.m2 / m.count : A(0);
}

template <typename A>
NORMOPS_HD A inv_std(A var, A eps) {
  return A(1) / std::sqrt(var + eps);
}

// Batch norm's running statistic after one batch: torch's exponential
// average, in double.
NORMOPS_HD double running_update(double running, double statistic, double momentum) {
  return (1.0 - momentum) * running + momentum * statistic;
}

// Activation applied to the pre-activation z, and the mask of where it passes
// gradient: the backward recomputes z from the saved input instead of keeping
// the output alive.
template <Act act, typename A>
NORMOPS_HD A activate(A z) {
  // Written so that NaN propagates, as torch.relu and F.relu6 do.
  if (act == Act::ReLU) return z < A(0) ? A(0) : z;
  if (act == Act::ReLU6) return z < A(0) ? A(0) : (z > A(6) ? A(6) : z);
  return z;
}

// Where torch's backward passes dy at a NaN z: ReLU passes it (z <= 0 is
// what zeroes it); ReLU6 stops it, as torch's vectorised hardtanh_backward
// does (its scalar tail passes it).
template <Act act, typename A>
NORMOPS_HD A activation_grad(A z, A dy) {
  if (act == Act::ReLU) return z <= A(0) ? A(0) : dy;
  if (act == Act::ReLU6) return (z > A(0) && z < A(6)) ? dy : A(0);
  return dy;
}

// The term b * (x - mean) of dx = a * g + b * (x - mean) + c, 0 where b is:
// with eval statistics (b = 0) dx is torch's a * g even where x is inf or
// NaN.
template <typename A>
NORMOPS_HD A centred_term(A b, A xm) {
  return b == A(0) ? A(0) : b * xm;
}

}  // namespace normops
