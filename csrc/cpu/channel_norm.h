// Drivers shared by the per-channel norms (batch norm) and the per-sample ones
// (group and instance norm): statistics, the affine step and the two backward
// passes over a ChannelView, parallel and in either layout. Constants are
// indexed per channel ([C], per_sample = false) or per (n, c) ([N*C],
// per_sample = true).
#pragma once

#include <cmath>
#include <memory>
#include <vector>

#include "../batch_norm_impl.h"
#include "common.h"

namespace normops {
namespace cpu {

// Batch norm's per-channel constants (batch_norm::Folded) of the statistics
// (mean, biased var), weight and bias (either may be absent), eps
// (csrc/cpu/batch_norm.cpp): what its CPU kernels read, and the depthwise
// convolution's input norm.
batch_norm::Folded fold_batch_norm(const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                   const OptTensor& bias, double eps, at::ScalarType acc);

// The folded affine step y = x * scale + shift, shift = bias - mean * scale
// rounded once, is as exact as the centred (x - mean) * scale + bias where
// every channel's mean lies within a few standard deviations of zero (the
// shift's rounding adds |mean| * rstd units in the last place of the
// output's scale) and the constants are finite; it reads two arrays of
// constants instead of three (channels_last rows in cache 1.3x faster).
// Writes the C shifts and returns true where so; otherwise returns false and
// leaves `shift` as it was. stats(c) gives channel c's (mean, rstd); w and b
// its weight and bias.
template <typename A, typename Stats>
bool fold_shifts(int64_t C, const Stats& stats, const double* w, const double* b, A* shift) {
  constexpr double kMaxSpreads = 8;
  for (int64_t c = 0; c < C; ++c) {
    const auto [mean, rstd] = stats(c);
    const double scale = rstd * w[c];
    if (!(std::abs(mean) * rstd <= kMaxSpreads && std::isfinite(scale) &&
          std::isfinite(b[c] - mean * scale)))
      return false;
  }
  for (int64_t c = 0; c < C; ++c) {
    const auto [mean, rstd] = stats(c);
    shift[c] = static_cast<A>(b[c] - mean * (rstd * w[c]));
  }
  return true;
}

// Splits of each sample's rows into parallel tasks of at least one cache
// block: enough tasks for every thread.
inline int64_t row_splits(int64_t samples, int64_t rows_per_sample, int64_t min_rows) {
  const int64_t threads = at::get_num_threads();
  const int64_t splits = (threads + samples - 1) / samples;
  return std::max<int64_t>(
      1, std::min<int64_t>(splits, rows_per_sample / std::max<int64_t>(1, min_rows)));
}

// Runs f(task, sample, row_begin, row_end, scratch) in parallel over
// `splits` tasks per sample (row indices absolute), rows of C values; tasks
// too small to be worth a thread's wake-up (grain_for) run together, sharing
// `scratch_len` uninitialised values of scratch (the kernels write it before
// reading it).
template <typename A, typename F>
void for_each_row_task(int64_t samples, int64_t rows_per_sample, int64_t splits, int64_t C,
                       int64_t scratch_len, const F& f) {
  const int64_t grain = grain_for(rows_per_sample / splits * C);
  at::parallel_for(0, samples * splits, grain, [&](int64_t t0, int64_t t1) {
    const std::unique_ptr<A[]> scratch(new A[static_cast<size_t>(scratch_len)]);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / splits, s = t % splits;
      const int64_t r0 = n * rows_per_sample + rows_per_sample * s / splits;
      const int64_t r1 = n * rows_per_sample + rows_per_sample * (s + 1) / splits;
      f(t, n, r0, r1, scratch.get());
    }
  });
}

// Moments (mean, m2) per channel (count N*HW) or per (n, c) (count HW).
template <typename T>
std::pair<Tensor, Tensor> channel_moments(const ChannelView& v, bool per_sample) {
  using A = acc_t<T>;
  const auto& k = kernels<T>();
  const auto opts = v.x.options().dtype(acc_dtype(v.x.scalar_type()));
  const int64_t out_len = per_sample ? v.N * v.C : v.C;
  Tensor mean = at::zeros({out_len}, opts), m2 = at::zeros({out_len}, opts);
  if (v.N * v.HW == 0 || v.C == 0) return {mean, m2};
  const T* x = ptr<const T>(v.x);
  if (!v.rows) {
    Tensor pm = per_sample ? mean : at::empty({v.N * v.C}, opts);
    Tensor pq = per_sample ? m2 : at::empty({v.N * v.C}, opts);
    const int64_t grain = std::max<int64_t>(1, 32768 / v.HW);
    A* plane_mean = ptr<A>(pm);
    A* plane_m2 = ptr<A>(pq);
    at::parallel_for(0, v.N * v.C, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        k.span_moments(x + p * v.HW, v.HW, 0, 1, p + 1 < p1 ? x + (p + 1) * v.HW : nullptr,
                       plane_mean + p, plane_m2 + p);
    });
    if (!per_sample) {
      A* om = ptr<A>(mean);
      A* oq = ptr<A>(m2);
      const A* im = ptr<A>(pm);
      const A* iq = ptr<A>(pq);
      // In double: merged in float, the planes' means drifted at the data's
      // scale (1e4 + N(0, 1): variance 3e-5 to 1.4e-4 wrong; in double 2e-6
      // to 2e-5, what the planes' means rounded to float leave).
      for (int64_t c = 0; c < v.C; ++c) {
        double count = 0, mu = 0, q = 0;
        for (int64_t n = 0; n < v.N; ++n)
          chan_merge(count, mu, q, double(v.HW), double(im[n * v.C + c]), double(iq[n * v.C + c]));
        om[c] = A(mu);
        oq[c] = A(q);
      }
    }
    return {mean, m2};
  }
  // Rows: each task reduces cache blocks of its row range and merges them.
  const int64_t samples = per_sample ? v.N : 1;
  const int64_t rows_per_sample = per_sample ? v.HW : v.N * v.HW;
  const int64_t R = block_rows(v.C, sizeof(T));
  const int64_t splits = row_splits(samples, rows_per_sample, R);
  const int64_t C = v.C;
  A* om = ptr<A>(mean);
  A* oq = ptr<A>(m2);
  if (splits == 1) {  // a task per sample, straight into its moments
    for_each_row_task<A>(samples, rows_per_sample, 1, C, 3 * C,
                         [&](int64_t, int64_t n, int64_t r0, int64_t r1, A* scratch) {
      k.column_moments(x + r0 * C, r1 - r0, C, R, om + n * C, nullptr, oq + n * C, scratch);
    });
    return {mean, m2};
  }
  // Per task: moments [3C] (mean, residual, m2).
  std::vector<A> part(static_cast<size_t>(samples * splits * C * 3));
  std::vector<A> part_count(static_cast<size_t>(samples * splits));
  for_each_row_task<A>(samples, rows_per_sample, splits, C, 3 * C,
                       [&](int64_t t, int64_t, int64_t r0, int64_t r1, A* scratch) {
    A* tm = part.data() + t * C * 3;
    k.column_moments(x + r0 * C, r1 - r0, C, R, tm, tm + C, tm + 2 * C, scratch);
    part_count[t] = A(r1 - r0);
  });
  // Every task holds at least one row: merge each sample's tasks into its first.
  for (int64_t n = 0; n < samples; ++n) {
    A* base = part.data() + n * splits * C * 3;
    A count = part_count[n * splits];
    for (int64_t s = 1; s < splits; ++s) {
      const int64_t t = n * splits + s;
      const A* tm = part.data() + t * C * 3;
      k.merge_columns(base, base + C, base + 2 * C, count, tm, tm + C, tm + 2 * C,
                      part_count[t], C);
      count += part_count[t];
    }
    for (int64_t c = 0; c < C; ++c) om[n * C + c] = base[c] + base[C + c];
    std::copy(base + 2 * C, base + 3 * C, oq + n * C);
  }
  return {mean, m2};
}

// out = act((x - mean) * scale + bias), or act(x * scale + bias) where mean
// is undefined (folded).
template <typename T>
void channel_affine(const ChannelView& v, const Tensor& out, const Tensor& mean,
                    const Tensor& scale, const Tensor& bias, bool per_sample, int act) {
  using A = acc_t<T>;
  if (v.x.numel() == 0) return;
  const auto& k = kernels<T>();
  const T* x = ptr<const T>(v.x);
  T* y = ptr<T>(out);
  const A* m = mean.defined() ? ptr<const A>(mean) : nullptr;
  const A* s = ptr<const A>(scale);
  const A* h = ptr<const A>(bias);
  const bool stream = stream_output(out);
  if (!v.rows) {
    const int64_t grain = std::max<int64_t>(1, 32768 / v.HW);
    const int64_t period = per_sample ? v.N * v.C : v.C;
    const bool buffered = streams_through_buffer<T>(stream, v.HW, 1);
    at::parallel_for(0, v.N * v.C, grain, [&](int64_t p0, int64_t p1) {
      const StreamFence fence{stream};
      if (!buffered) {  // runs of planes whose constants follow each other
        for_each_segment(p0, p1, period, [&](int64_t p, int64_t end, int64_t wraps) {
          const int64_t i = p - wraps * period;
          k.plane_affine[act](x + p * v.HW, y + p * v.HW, v.HW, end - p, m ? m + i : nullptr,
                              s + i, h + i);
        });
        return;
      }
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t i = p % period;
        write_output(k, stream, y + p * v.HW, v.HW, 0, 1, 1, [&](T* dst, int64_t o, int64_t n) {
          k.span_affine[act](x + p * v.HW + o, dst, n, 0, 1, m ? m[i] : A(0), s[i], h[i]);
        });
      }
    });
    return;
  }
  const int64_t C = v.C;
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  // Rows are cut where the constants change: at samples, if per sample.
  const int64_t segment = per_sample ? v.HW : v.N * v.HW;
  at::parallel_for(0, v.N * v.HW, grain, [&](int64_t r0, int64_t r1) {
    const StreamFence fence{stream};
    write_output(k, stream, y + r0 * C, (r1 - r0) * C, 0, 1, C, [&](T* dst, int64_t o, int64_t n) {
      const int64_t first = r0 + o / C;
      for_each_segment(first, first + n / C, segment, [&](int64_t r, int64_t end, int64_t smp) {
        k.row_affine[act](x + r * C, dst + (r - first) * C, end - r, C, m ? m + smp * C : nullptr,
                          s + smp * C, h + smp * C);
      });
    });
  });
}

// Per channel or per (n, c): sum of g and of g * (x - mean), where g is dy
// masked by the activation at (x - mean) * scale + bias. Double tensors.
template <typename T>
std::pair<Tensor, Tensor> channel_grad_sums(const ChannelView& v, const Tensor& dy,
                                            const Tensor& mean, const Tensor& scale,
                                            const Tensor& bias, bool per_sample, int act) {
  using A = acc_t<T>;
  const auto& k = kernels<T>();
  const auto dopts = v.x.options().dtype(at::kDouble);
  const int64_t out_len = per_sample ? v.N * v.C : v.C;
  Tensor sum_dy = at::zeros({out_len}, dopts), sum_dy_xmu = at::zeros({out_len}, dopts);
  if (v.N * v.HW == 0 || v.C == 0) return {sum_dy, sum_dy_xmu};
  const T* x = ptr<const T>(v.x);
  const T* g = ptr<const T>(dy);
  const A* m = ptr<const A>(mean);
  const A* s = ptr<const A>(scale);
  const A* h = ptr<const A>(bias);
  double* od = ptr<double>(sum_dy);
  double* ox = ptr<double>(sum_dy_xmu);
  const int64_t C = v.C;
  if (!v.rows) {
    const auto opts = v.x.options().dtype(acc_dtype(v.x.scalar_type()));
    Tensor pd = at::empty({v.N * C}, opts), px = at::empty({v.N * C}, opts);
    const int64_t grain = std::max<int64_t>(1, 32768 / v.HW);
    const int64_t period = per_sample ? v.N * C : C;
    A* plane_dy = ptr<A>(pd);
    A* plane_dy_xmu = ptr<A>(px);
    at::parallel_for(0, v.N * C, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        k.span_grad_sums[act](g + p * v.HW, x + p * v.HW, v.HW, 0, 1, m[p % period],
                              s[p % period], h[p % period], plane_dy + p, plane_dy_xmu + p);
    });
    const A* id = ptr<const A>(pd);
    const A* ix = ptr<const A>(px);
    for (int64_t p = 0; p < v.N * C; ++p) {
      const int64_t o = per_sample ? p : p % C;
      od[o] += id[p];
      ox[o] += ix[p];
    }
    return {sum_dy, sum_dy_xmu};
  }
  const int64_t samples = per_sample ? v.N : 1;
  const int64_t rows_per_sample = per_sample ? v.HW : v.N * v.HW;
  const int64_t R = block_rows(C, 2 * sizeof(T));
  const int64_t splits = row_splits(samples, rows_per_sample, R);
  const auto sums = [&](int64_t n, int64_t r0, int64_t r1, double* ad, double* ax, A* scratch) {
    const int64_t o = per_sample ? n * C : 0;
    k.row_grad_sums[act](g + r0 * C, x + r0 * C, r1 - r0, C, R, m + o, s + o, h + o, ad, ax,
                         scratch);
  };
  if (splits == 1) {  // a task per sample, added straight into its sums
    for_each_row_task<A>(samples, rows_per_sample, 1, C, 2 * C,
                         [&](int64_t, int64_t n, int64_t r0, int64_t r1, A* scratch) {
      sums(n, r0, r1, od + n * C, ox + n * C, scratch);
    });
    return {sum_dy, sum_dy_xmu};
  }
  // Per task: double accumulators [2C].
  std::vector<double> acc(static_cast<size_t>(samples * splits * C * 2), 0.0);
  for_each_row_task<A>(samples, rows_per_sample, splits, C, 2 * C,
                       [&](int64_t t, int64_t n, int64_t r0, int64_t r1, A* scratch) {
    double* ad = acc.data() + t * C * 2;
    sums(n, r0, r1, ad, ad + C, scratch);
  });
  for (int64_t n = 0; n < samples; ++n) {
    for (int64_t sp = 0; sp < splits; ++sp) {
      const double* ad = acc.data() + (n * splits + sp) * C * 2;
      for (int64_t c = 0; c < C; ++c) {
        od[n * C + c] += ad[c];
        ox[n * C + c] += ad[C + c];
      }
    }
  }
  return {sum_dy, sum_dy_xmu};
}

// dx = a * g + b * (x - m) + c, g masked at (x - m) * scale + bias.
template <typename T>
void channel_grad_input(const ChannelView& v, const Tensor& dy, const Tensor& dx,
                        const Tensor& a, const Tensor& b, const Tensor& m, const Tensor& c,
                        const Tensor& scale, const Tensor& bias, bool per_sample, int act) {
  using A = acc_t<T>;
  if (v.x.numel() == 0) return;
  const auto& k = kernels<T>();
  const T* x = ptr<const T>(v.x);
  const T* g = ptr<const T>(dy);
  T* d = ptr<T>(dx);
  const A *pa = ptr<const A>(a), *pb = ptr<const A>(b), *pm = ptr<const A>(m),
          *pc = ptr<const A>(c), *ps = ptr<const A>(scale), *ph = ptr<const A>(bias);
  const bool stream = stream_output(dx);
  if (!v.rows) {
    const int64_t grain = std::max<int64_t>(1, 32768 / v.HW);
    const int64_t period = per_sample ? v.N * v.C : v.C;
    const bool buffered = streams_through_buffer<T>(stream, v.HW, 1);
    at::parallel_for(0, v.N * v.C, grain, [&](int64_t p0, int64_t p1) {
      const StreamFence fence{stream};
      if (!buffered) {  // as channel_affine
        for_each_segment(p0, p1, period, [&](int64_t p, int64_t end, int64_t wraps) {
          const int64_t i = p - wraps * period, base = p * v.HW;
          k.plane_grad_input[act](g + base, x + base, d + base, v.HW, end - p, pa + i, pb + i,
                                  pm + i, pc + i, ps + i, ph + i);
        });
        return;
      }
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t i = p % period, base = p * v.HW;
        write_output(k, stream, d + base, v.HW, 0, 1, 1, [&](T* dst, int64_t o, int64_t n) {
          k.span_grad_input[act](g + base + o, x + base + o, dst, n, 0, 1, pa[i], pb[i], pm[i],
                                 pc[i], ps[i], ph[i]);
        });
      }
    });
    return;
  }
  const int64_t C = v.C;
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  const int64_t segment = per_sample ? v.HW : v.N * v.HW;
  at::parallel_for(0, v.N * v.HW, grain, [&](int64_t r0, int64_t r1) {
    const StreamFence fence{stream};
    write_output(k, stream, d + r0 * C, (r1 - r0) * C, 0, 1, C, [&](T* dst, int64_t o, int64_t n) {
      const int64_t first = r0 + o / C;
      for_each_segment(first, first + n / C, segment, [&](int64_t r, int64_t end, int64_t smp) {
        const int64_t c0 = smp * C;
        k.row_grad_input[act](g + r * C, x + r * C, dst + (r - first) * C, end - r, C, pa + c0,
                              pb + c0, pm + c0, pc + c0, ps + c0, ph + c0);
      });
    });
  });
}

// The drivers above for any input dtype: what the shared op logic
// (csrc/batch_norm_impl.h, csrc/group_norm_impl.h) calls.
struct ChannelDrivers {
  static std::pair<Tensor, Tensor> moments(const ChannelView& v, bool per_sample) {
    std::pair<Tensor, Tensor> r;
    dispatch_floating(v.x.scalar_type(), "normops", [&](auto tag) {
      r = channel_moments<typename decltype(tag)::type>(v, per_sample);
    });
    return r;
  }
  static void affine(const ChannelView& v, const Tensor& out, const Tensor& mean,
                     const Tensor& scale, const Tensor& bias, bool per_sample, int act) {
    dispatch_floating(v.x.scalar_type(), "normops", [&](auto tag) {
      channel_affine<typename decltype(tag)::type>(v, out, mean, scale, bias, per_sample, act);
    });
  }
  static std::pair<Tensor, Tensor> grad_sums(const ChannelView& v, const Tensor& dy,
                                             const Tensor& mean, const Tensor& scale,
                                             const Tensor& bias, bool per_sample, int act) {
    std::pair<Tensor, Tensor> r;
    dispatch_floating(v.x.scalar_type(), "normops", [&](auto tag) {
      r = channel_grad_sums<typename decltype(tag)::type>(v, dy, mean, scale, bias, per_sample,
                                                          act);
    });
    return r;
  }
  static void grad_input(const ChannelView& v, const Tensor& dy, const Tensor& dx,
                         const Tensor& a, const Tensor& b, const Tensor& m, const Tensor& c,
                         const Tensor& scale, const Tensor& bias, bool per_sample, int act) {
    dispatch_floating(v.x.scalar_type(), "normops", [&](auto tag) {
      channel_grad_input<typename decltype(tag)::type>(v, dy, dx, a, b, m, c, scale, bias,
                                                       per_sample, act);
    });
  }
};

}  // namespace cpu
}  // namespace normops
