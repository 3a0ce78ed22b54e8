// Group norm's CPU backend: per-(n, group) constants computed in double in
// plain loops (a call's fixed cost stays near ATen's), around the kernels.
// NCHW with enough groups for every thread is fused per (n, group); other
// inputs go through the channel drivers. The op logic is
// csrc/group_norm_impl.h.
#include <torch/library.h>

#include "../group_norm_impl.h"
#include "channel_norm.h"

namespace normops {
namespace cpu {
namespace {

using group_norm::kOp;

// An (n, group)'s mean and rstd from its D channels' moments (HW values
// each), merged with Chan's formula for equal counts, in double; writes the
// channels' constants (mean, scale, bias) for the affine kernels.
template <typename A>
std::pair<double, double> group_statistics(const A* mc, const A* qc, int64_t D, int64_t HW,
                                           const double* wg, const double* bg, double eps,
                                           A* cm, A* cs, A* cb) {
  double mu = 0, m2 = 0;
  for (int64_t d = 0; d < D; ++d) mu += double(mc[d]);
  mu /= double(D);
  for (int64_t d = 0; d < D; ++d) {
    const double delta = double(mc[d]) - mu;
    m2 += double(qc[d]) + delta * delta * double(HW);
  }
  const double r = 1.0 / std::sqrt(m2 / double(D * HW) + eps);
  for (int64_t d = 0; d < D; ++d) {
    cm[d] = A(mu);
    cs[d] = A(r * wg[d]);
    cb[d] = A(bg[d]);
  }
  return {mu, r};
}

// An (n, group)'s input-gradient coefficients from its D channels' sums:
// dx = a * dy + b * (x - mean) + c, a per channel, b and c per group.
template <typename A>
void group_grad_coefficients(const double* sum_dy, const double* sum_dy_xmu, const double* wg,
                             int64_t D, double r, double count, A* a, A* b, A* c) {
  double e1 = 0, e2 = 0;
  for (int64_t j = 0; j < D; ++j) {
    e1 += wg[j] * sum_dy[j];
    e2 += wg[j] * sum_dy_xmu[j];
  }
  const A kb = A(centred_coefficient(r, r, e2 / count)), kc = A(-r * e1 / count);
  for (int64_t j = 0; j < D; ++j) {
    a[j] = A(r * wg[j]);
    b[j] = kb;
    c[j] = kc;
  }
}

// NCHW (or one spatial element, [N, C]) with enough groups for every thread:
// each (n, group) is one contiguous span of C/G planes, normalised (or
// differentiated) right after its reduction while it is still in cache: one
// read of x (and dy) from memory. Planes of one value are walked as one row
// of C/G channels by the plane kernels (a call per value cost 4x ATen's time).
bool fused_by_group(const ChannelView& v, int64_t G) {
  return (!v.rows || v.HW == 1) && v.N * G >= at::get_num_threads();
}

// Channels_last where every thread has samples (two, or one of a small
// tensor), or there is too little work for more than one thread: each
// sample's HW rows of C channels are reduced, then normalised (or
// differentiated) while in cache, with constants of its own: none of the
// drivers' [N, C] temporaries, one parallel region instead of three (short
// planes: 2-3x faster). One large sample is split across threads by the
// drivers instead (1×256×32×32 forward: 40 µs, by sample 54 µs).
bool fused_by_sample(const ChannelView& v) {
  const int64_t threads = at::get_num_threads(), values = v.N * v.HW * v.C;
  return v.rows && v.HW > 1 &&
         (v.N >= 2 * threads || (v.N >= threads && values <= 8 * grain_for(1)) ||
          values <= grain_for(1));
}

// Forward by group; fills mean and rstd [N*G].
template <typename T>
void forward_by_group(const ChannelView& v, int64_t G, const Tensor& out, const double* w,
                      const double* b, double eps, double* mean, double* rstd) {
  using A = acc_t<T>;
  const auto& k = kernels<T>();
  const int64_t D = v.C / G;
  const T* x = ptr<const T>(v.x);
  T* y = ptr<T>(out);
  const bool stream = stream_output(out);
  const bool buffered = v.HW > 1 && streams_through_buffer<T>(stream, D * v.HW, 1);
  at::parallel_for(0, v.N * G, grain_for(v.C / G * v.HW), [&](int64_t g0, int64_t g1) {
    const StreamFence fence{stream};
    std::vector<A> consts(buffered ? 0 : 3 * D);  // the group's planes' mean, scale, bias
    for (int64_t ng = g0; ng < g1; ++ng) {
      A gm, gq;
      k.span_moments(x + ng * D * v.HW, D * v.HW, 0, 1, ng + 1 < g1 ? x + (ng + 1) * D * v.HW : nullptr,
                     &gm, &gq);
      const double r = 1.0 / std::sqrt(double(gq) / double(D * v.HW) + eps);
      // The group's planes are contiguous: one run of D planes.
      const int64_t base = ng * D * v.HW, c0 = (ng % G) * D;
      if (!buffered) {  // one call for the group's planes (short planes: a call per plane cost
                        // as much as its values)
        for (int64_t d = 0; d < D; ++d) {
          consts[d] = gm;
          consts[D + d] = A(r * w[c0 + d]);
          consts[2 * D + d] = A(b[c0 + d]);
        }
        k.plane_affine[0](x + base, y + base, v.HW, D, consts.data(), consts.data() + D,
                          consts.data() + 2 * D);
      } else {
        write_output(k, stream, y + base, D * v.HW, 0, 1, 1, [&](T* dst, int64_t o, int64_t n) {
          for_each_segment(o, o + n, v.HW, [&](int64_t i, int64_t end, int64_t d) {
            k.span_affine[0](x + base + i, dst + (i - o), end - i, 0, 1, gm, A(r * w[c0 + d]),
                             A(b[c0 + d]));
          });
        });
      }
      mean[ng] = gm;
      rstd[ng] = r;
    }
  });
}

// Forward through the drivers: per-(n, c) moments (HW values each), merged
// into groups with Chan's formula for equal counts, in double.
template <typename T>
void forward_by_channel(const ChannelView& v, int64_t G, const Tensor& out, const double* w,
                        const double* b, double eps, double* mean, double* rstd) {
  using A = acc_t<T>;
  const int64_t N = v.N, C = v.C, D = C / G;
  auto [mean_c, m2_c] = channel_moments<T>(v, /*per_sample=*/true);
  const A* mc = ptr<const A>(mean_c);
  const A* qc = ptr<const A>(m2_c);
  Tensor consts = at::empty({3, N * C}, mean_c.options());  // mean, scale, bias per (n, c)
  A* k = ptr<A>(consts);
  // As many constants as values when the planes are short: in parallel.
  at::parallel_for(0, N * G, grain_for(4 * D), [&](int64_t g0, int64_t g1) {
    for (int64_t ng = g0; ng < g1; ++ng) {
      const int64_t p0 = ng * D, c0 = (ng % G) * D;
      std::tie(mean[ng], rstd[ng]) = group_statistics(mc + p0, qc + p0, D, v.HW, w + c0, b + c0,
                                                      eps, k + p0, k + N * C + p0,
                                                      k + 2 * N * C + p0);
    }
  });
  channel_affine<T>(v, out, consts[0], consts[1], consts[2], /*per_sample=*/true, 0);
}

// f(n, buf) for every sample n, in parallel tasks of whole samples, buf the
// task's `len` values of scratch; outputs streamed when `stream`.
template <typename A, typename F>
void for_each_sample(const ChannelView& v, bool stream, int64_t len, const F& f) {
  at::parallel_for(0, v.N, grain_for(v.HW * v.C), [&](int64_t n0, int64_t n1) {
    const StreamFence fence{stream};
    std::vector<A> buf(static_cast<size_t>(len));
    for (int64_t n = n0; n < n1; ++n) f(n, buf.data());
  });
}

// Forward by sample (fused_by_sample).
template <typename T>
void forward_by_sample(const ChannelView& v, int64_t G, const Tensor& out, const double* w,
                       const double* b, double eps, double* mean, double* rstd) {
  using A = acc_t<T>;
  const auto& k = kernels<T>();
  const int64_t C = v.C, D = C / G, HW = v.HW;
  const int64_t R = block_rows(C, sizeof(T));
  const T* x = ptr<const T>(v.x);
  T* y = ptr<T>(out);
  const bool stream = stream_output(out);
  // Per channel: moments (mean, m2) and column_moments' scratch [3C], then
  // the affine constants (mean, scale, bias) over the scratch.
  for_each_sample<A>(v, stream, 5 * C, [&](int64_t n, A* buf) {
    A *mc = buf, *qc = mc + C, *cm = qc + C, *cs = cm + C, *cb = cs + C;
    const T* xn = x + n * HW * C;
    k.column_moments(xn, HW, C, R, mc, nullptr, qc, cm);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * D;
      std::tie(mean[n * G + g], rstd[n * G + g]) = group_statistics(
          mc + c0, qc + c0, D, HW, w + c0, b + c0, eps, cm + c0, cs + c0, cb + c0);
    }
    const bool folded = fold_shifts(
        C, [&](int64_t c) { return std::pair{mean[n * G + c / D], rstd[n * G + c / D]}; }, w, b,
        cb);
    write_output(k, stream, y + n * HW * C, HW * C, 0, 1, C, [&](T* dst, int64_t o, int64_t m) {
      k.row_affine[0](xn + o, dst, m / C, C, folded ? nullptr : cm, cs, cb);
    });
  });
}

// Backward by group: fills dx; returns the per-(n, c) sums of dy and
// dy*(x-mean) (double).
template <typename T>
std::pair<Tensor, Tensor> backward_by_group(const ChannelView& v, int64_t G, const Tensor& dy,
                                            const Tensor& dx, const double* mean,
                                            const double* rstd, const double* w) {
  using A = acc_t<T>;
  const auto& k = kernels<T>();
  const int64_t D = v.C / G;
  const auto dopts = v.x.options().dtype(at::kDouble);
  Tensor sums_dy = at::empty({v.N * v.C}, dopts), sums_dy_xmu = at::empty({v.N * v.C}, dopts);
  double* sum_dy = ptr<double>(sums_dy);
  double* sum_dy_xmu = ptr<double>(sums_dy_xmu);
  const double count = double(D * v.HW);
  const T* x = ptr<const T>(v.x);
  const T* g = ptr<const T>(dy);
  T* d = ptr<T>(dx);
  const bool stream = stream_output(dx);
  const bool buffered = v.HW > 1 && streams_through_buffer<T>(stream, D * v.HW, 1);
  at::parallel_for(0, v.N * G, grain_for(v.C / G * v.HW), [&](int64_t g0, int64_t g1) {
    const StreamFence fence{stream};
    // The group's planes' a, b, mean and c, for plane_grad_input; first
    // their sums.
    std::vector<A> coef(4 * D);
    for (int64_t ng = g0; ng < g1; ++ng) {
      const A m = A(mean[ng]);
      const int64_t p0 = ng * D, base = p0 * v.HW, c0 = (ng % G) * D;
      k.plane_grad_sums(g + base, x + base, v.HW, D, m, coef.data(), coef.data() + D);
      for (int64_t j = 0; j < D; ++j) {
        sum_dy[p0 + j] = coef[j];
        sum_dy_xmu[p0 + j] = coef[D + j];
      }
      A* a = coef.data();
      A* b = a + D;
      A* ms = b + D;
      A* c = ms + D;
      group_grad_coefficients(sum_dy + p0, sum_dy_xmu + p0, w + c0, D, rstd[ng], count, a, b, c);
      if (!buffered) {  // one call for the group's planes, as in the forward
        std::fill_n(ms, D, m);
        // No activation: the mask's scale and bias arguments are not read.
        k.plane_grad_input[0](g + base, x + base, d + base, v.HW, D, a, b, ms, c, a, a);
      } else {
        write_output(k, stream, d + base, D * v.HW, 0, 1, 1, [&](T* dst, int64_t o, int64_t n) {
          for_each_segment(o, o + n, v.HW, [&](int64_t i, int64_t end, int64_t j) {
            k.span_grad_input[0](g + base + i, x + base + i, dst + (i - o), end - i, 0, 1, a[j],
                                 b[j], m, c[j], 1, 0);
          });
        });
      }
    }
  });
  return {sums_dy, sums_dy_xmu};
}

// dx = rstd*w*dy - rstd^3 * E[dy*w*(x-mean)] * (x-mean) - rstd * E[dy*w],
// the expectations over each (n, group); through the drivers. Fills dx when
// it is defined; returns the per-(n, c) sums, as backward_by_group.
template <typename T>
std::pair<Tensor, Tensor> backward_by_channel(const ChannelView& v, int64_t G, const Tensor& dy,
                                              const Tensor& dx, const double* mean,
                                              const double* rstd, const double* w) {
  using A = acc_t<T>;
  const int64_t N = v.N, C = v.C, D = C / G;
  const double count = double(D * v.HW);
  // a, b, mean, c per (n, c): dx = a * dy + b * (x - mean) + c.
  Tensor coef = at::empty({4, N * C}, v.x.options().dtype(acc_dtype(v.x.scalar_type())));
  A* k = ptr<A>(coef);
  at::parallel_for(0, N * G, grain_for(D), [&](int64_t g0, int64_t g1) {
    for (int64_t ng = g0; ng < g1; ++ng) std::fill_n(k + 2 * N * C + ng * D, D, A(mean[ng]));
  });
  // No activation: the mask's scale and bias arguments are not read.
  auto sums = channel_grad_sums<T>(v, dy, coef[2], coef[2], coef[2], /*per_sample=*/true, 0);
  if (!dx.defined()) return sums;
  const double* sum_dy = ptr<const double>(sums.first);
  const double* sum_dy_xmu = ptr<const double>(sums.second);
  at::parallel_for(0, N * G, grain_for(4 * D), [&](int64_t g0, int64_t g1) {
    for (int64_t ng = g0; ng < g1; ++ng) {
      const int64_t p0 = ng * D;
      group_grad_coefficients(sum_dy + p0, sum_dy_xmu + p0, w + (ng % G) * D, D, rstd[ng], count,
                              k + p0, k + N * C + p0, k + 3 * N * C + p0);
    }
  });
  channel_grad_input<T>(v, dy, dx, coef[0], coef[1], coef[2], coef[3], coef[0], coef[0],
                        /*per_sample=*/true, 0);
  return sums;
}

// Backward by sample (fused_by_sample): fills dx; returns the sums, as
// backward_by_group.
template <typename T>
std::pair<Tensor, Tensor> backward_by_sample(const ChannelView& v, int64_t G, const Tensor& dy,
                                             const Tensor& dx, const double* mean,
                                             const double* rstd, const double* w) {
  using A = acc_t<T>;
  const auto& k = kernels<T>();
  const int64_t C = v.C, D = C / G, HW = v.HW;
  const int64_t R = block_rows(C, 2 * sizeof(T));
  const double count = double(D * HW);
  const auto dopts = v.x.options().dtype(at::kDouble);
  Tensor sums_dy = at::zeros({v.N * C}, dopts), sums_dy_xmu = at::zeros({v.N * C}, dopts);
  double* sum_dy = ptr<double>(sums_dy);
  double* sum_dy_xmu = ptr<double>(sums_dy_xmu);
  const T* x = ptr<const T>(v.x);
  const T* g = ptr<const T>(dy);
  T* d = ptr<T>(dx);
  const bool stream = stream_output(dx);
  // Per channel: a, b, mean, c, then row_grad_sums' scratch [2C].
  for_each_sample<A>(v, stream, 6 * C, [&](int64_t n, A* buf) {
    A *a = buf, *b = a + C, *ms = b + C, *c = ms + C, *scratch = c + C;
    const int64_t base = n * HW * C;
    for (int64_t gr = 0; gr < G; ++gr) std::fill_n(ms + gr * D, D, A(mean[n * G + gr]));
    // No activation: the mask's scale and bias arguments are not read.
    k.row_grad_sums[0](g + base, x + base, HW, C, R, ms, ms, ms, sum_dy + n * C,
                       sum_dy_xmu + n * C, scratch);
    for (int64_t gr = 0; gr < G; ++gr) {
      const int64_t c0 = gr * D;
      group_grad_coefficients(sum_dy + n * C + c0, sum_dy_xmu + n * C + c0, w + c0, D,
                              rstd[n * G + gr], count, a + c0, b + c0, c + c0);
    }
    write_output(k, stream, d + base, HW * C, 0, 1, C, [&](T* dst, int64_t o, int64_t m) {
      k.row_grad_input[0](g + base + o, x + base + o, dst, m / C, C, a, b, ms, c, a, a);
    });
  });
  return {sums_dy, sums_dy_xmu};
}

struct CpuGroupNorm {
  static std::tuple<Tensor, Tensor, Tensor> forward(const ChannelView& v, int64_t G,
                                                    const OptTensor& weight,
                                                    const OptTensor& bias, double eps) {
    const auto opts = v.x.options().dtype(acc_dtype(v.x.scalar_type()));
    std::vector<double> mean(static_cast<size_t>(v.N * G), 0.0), rstd(mean);
    Tensor out = like(v);
    if (v.x.numel() > 0) {
      const auto w = param_as_double(weight, v.C, 1.0), b = param_as_double(bias, v.C, 0.0);
      dispatch_floating(v.x.scalar_type(), kOp, [&](auto tag) {
        using T = typename decltype(tag)::type;
        (fused_by_group(v, G)  ? forward_by_group<T>
         : fused_by_sample(v) ? forward_by_sample<T>
                              : forward_by_channel<T>)(v, G, out, w.data(), b.data(), eps,
                                                       mean.data(), rstd.data());
      });
    }
    return {out, from_double(mean.data(), {v.N, G}, opts), from_double(rstd.data(), {v.N, G}, opts)};
  }

  static std::tuple<Tensor, Tensor, Tensor> backward(const ChannelView& v, int64_t G,
                                                     const Tensor& dy, const Tensor& mean,
                                                     const Tensor& rstd, const OptTensor& weight,
                                                     std::array<bool, 3> output_mask) {
    const int64_t N = v.N, C = v.C, D = C / G;
    std::vector<double> md(static_cast<size_t>(N * G)), rd(md);
    read_as_double(mean.reshape({N * G}), md.data());
    read_as_double(rstd.reshape({N * G}), rd.data());
    const auto w = param_as_double(weight, C, 1.0);
    Tensor dx = output_mask[0] ? like(v) : Tensor();
    std::pair<Tensor, Tensor> sums;
    if (v.x.numel() > 0) {
      dispatch_floating(v.x.scalar_type(), kOp, [&](auto tag) {
        using T = typename decltype(tag)::type;
        const bool fused = dx.defined();
        sums = (fused && fused_by_group(v, G) ? backward_by_group<T>
                : fused && fused_by_sample(v) ? backward_by_sample<T>
                                              : backward_by_channel<T>)(v, G, dy, dx, md.data(),
                                                                        rd.data(), w.data());
      });
    }
    // Parameter gradients have the weight's dtype (the input's without one).
    std::vector<double> grad_weight(static_cast<size_t>(C), 0.0), grad_bias(grad_weight);
    if (v.x.numel() > 0) {
      const double* sum_dy = ptr<const double>(sums.first);
      const double* sum_dy_xmu = ptr<const double>(sums.second);
      at::parallel_for(0, G, grain_for(N * D), [&](int64_t g0, int64_t g1) {
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t g = g0; g < g1; ++g) {
            const double r = rd[n * G + g];
            for (int64_t c = g * D; c < (g + 1) * D; ++c) {
              grad_weight[c] += sum_dy_xmu[n * C + c] * r;
              grad_bias[c] += sum_dy[n * C + c];
            }
          }
        }
      });
    }
    return {output_mask[0] ? dx : at::empty({0}, v.x.options()),
            param_grad_from(v.x, output_mask[1], weight, grad_weight),
            param_grad_from(v.x, output_mask[2], weight, grad_bias)};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(normops, CPU, m) { group_norm::register_kernels<CpuGroupNorm>(m); }

}  // namespace cpu
}  // namespace normops
