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

// NCHW (or one spatial element, [N, C]) with enough groups for every thread:
// each (n, group) is one contiguous span of C/G planes, normalised (or
// differentiated) right after its reduction while it is still in cache: one
// read of x (and dy) from memory. Planes of one value are walked as one row
// of C/G channels (a kernel call per value cost 4x ATen's time).
bool fused_by_group(const ChannelView& v, int64_t G) {
  return (!v.rows || v.HW == 1) && v.N * G >= at::get_num_threads();
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
  const auto group_affine = v.HW == 1 ? k.row_affine[0] : k.plane_affine[0];
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
        group_affine(x + base, y + base, v.HW, D, consts.data(), consts.data() + D,
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
      const int64_t p0 = ng * D;
      double mu = 0, m2 = 0;
      for (int64_t d = 0; d < D; ++d) mu += double(mc[p0 + d]);
      mu /= double(D);
      for (int64_t d = 0; d < D; ++d) {
        const double delta = double(mc[p0 + d]) - mu;
        m2 += double(qc[p0 + d]) + delta * delta * double(v.HW);
      }
      const double r = 1.0 / std::sqrt(m2 / double(D * v.HW) + eps);
      const double* wg = w + (ng % G) * D;
      const double* bg = b + (ng % G) * D;
      for (int64_t d = 0; d < D; ++d) {
        k[p0 + d] = A(mu);
        k[N * C + p0 + d] = A(r * wg[d]);
        k[2 * N * C + p0 + d] = A(bg[d]);
      }
      mean[ng] = mu;
      rstd[ng] = r;
    }
  });
  channel_affine<T>(v, out, consts[0], consts[1], consts[2], /*per_sample=*/true, 0);
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
  const auto group_grad_input = v.HW == 1 ? k.row_grad_input[0] : k.plane_grad_input[0];
  at::parallel_for(0, v.N * G, grain_for(v.C / G * v.HW), [&](int64_t g0, int64_t g1) {
    const StreamFence fence{stream};
    // The group's planes' a, b, mean and c, for plane_grad_input; first
    // their sums.
    std::vector<A> coef(4 * D);
    for (int64_t ng = g0; ng < g1; ++ng) {
      const A m = A(mean[ng]);
      const double r = rstd[ng];
      const int64_t p0 = ng * D, base = p0 * v.HW, c0 = (ng % G) * D;
      k.plane_grad_sums(g + base, x + base, v.HW, D, m, coef.data(), coef.data() + D);
      double e1 = 0, e2 = 0;
      for (int64_t j = 0; j < D; ++j) {
        sum_dy[p0 + j] = coef[j];
        sum_dy_xmu[p0 + j] = coef[D + j];
        e1 += w[c0 + j] * sum_dy[p0 + j];
        e2 += w[c0 + j] * sum_dy_xmu[p0 + j];
      }
      const A kb = A(centred_coefficient(r, r, e2 / count)), kc = A(-r * e1 / count);
      if (!buffered) {  // one call for the group's planes, as in the forward
        for (int64_t j = 0; j < D; ++j) {
          coef[j] = A(r * w[c0 + j]);
          coef[D + j] = kb;
          coef[2 * D + j] = m;
          coef[3 * D + j] = kc;
        }
        // No activation: the mask's scale and bias arguments are not read.
        const A* pc = coef.data();
        group_grad_input(g + base, x + base, d + base, v.HW, D, pc, pc + D, pc + 2 * D,
                         pc + 3 * D, pc, pc);
      } else {
        write_output(k, stream, d + base, D * v.HW, 0, 1, 1, [&](T* dst, int64_t o, int64_t n) {
          for_each_segment(o, o + n, v.HW, [&](int64_t i, int64_t end, int64_t j) {
            k.span_grad_input[0](g + base + i, x + base + i, dst + (i - o), end - i, 0, 1,
                                 A(r * w[c0 + j]), kb, m, kc, 1, 0);
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
      const double* wg = w + (ng % G) * D;
      double e1 = 0, e2 = 0;
      for (int64_t j = 0; j < D; ++j) {
        e1 += wg[j] * sum_dy[p0 + j];
        e2 += wg[j] * sum_dy_xmu[p0 + j];
      }
      const double r = rstd[ng];
      const A kb = A(centred_coefficient(r, r, e2 / count)), kc = A(-r * e1 / count);
      for (int64_t j = 0; j < D; ++j) {
        k[p0 + j] = A(r * wg[j]);
        k[N * C + p0 + j] = kb;
        k[3 * N * C + p0 + j] = kc;
      }
    }
  });
  channel_grad_input<T>(v, dy, dx, coef[0], coef[1], coef[2], coef[3], coef[0], coef[0],
                        /*per_sample=*/true, 0);
  return sums;
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
        (fused_by_group(v, G) ? forward_by_group<T> : forward_by_channel<T>)(
            v, G, out, w.data(), b.data(), eps, mean.data(), rstd.data());
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
        sums = (dx.defined() && fused_by_group(v, G) ? backward_by_group<T>
                                                     : backward_by_channel<T>)(
            v, G, dy, dx, md.data(), rd.data(), w.data());
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
