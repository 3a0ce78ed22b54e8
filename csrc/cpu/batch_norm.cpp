// Batch norm's CPU backend: the shared drivers, plus the NCHW training path
// fused per channel. The op logic is csrc/batch_norm_impl.h.
#include <torch/library.h>

#include "../batch_norm_impl.h"
#include "channel_norm.h"

namespace normops {
namespace cpu {

// In loops over the C values: a dozen small ATen ops (as the CUDA backend's
// dx_coefficients uses) cost tens of microseconds per call, more than the
// computation, which small tensors notice.
batch_norm::Folded fold_batch_norm(const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                   const OptTensor& bias, double eps, at::ScalarType acc) {
  const int64_t C = mean.size(0);
  Tensor dbl = at::empty({3, C}, mean.options().dtype(at::kDouble));  // mean, invstd, weight
  Tensor consts = at::empty({4, C}, mean.options().dtype(acc));  // mean, scale, bias, shift
  double* d = ptr<double>(dbl);
  const std::vector<double> b = param_as_double(bias, C, 0.0);
  read_as_double(mean, d);
  read_as_double(var, d + C);
  if (present(weight)) read_as_double(*weight, d + 2 * C); else std::fill(d + 2 * C, d + 3 * C, 1.0);
  for (int64_t c = 0; c < C; ++c) d[C + c] = 1.0 / std::sqrt(d[C + c] + eps);
  bool foldable = false;
  AT_DISPATCH_FLOATING_TYPES(acc, batch_norm::kOp, [&] {
    scalar_t* k = ptr<scalar_t>(consts);
    for (int64_t c = 0; c < C; ++c) {
      k[c] = static_cast<scalar_t>(d[c]);
      k[C + c] = static_cast<scalar_t>(d[C + c] * d[2 * C + c]);
      k[2 * C + c] = static_cast<scalar_t>(b[c]);
    }
    foldable = fold_shifts(C, [&](int64_t c) { return std::pair{d[c], d[C + c]}; }, d + 2 * C,
                           b.data(), k + 3 * C);
  });
  return batch_norm::Folded{dbl[0],    dbl[1],    dbl[2],   consts[0],
                            consts[1], consts[2], foldable ? consts[3] : Tensor()};
}

namespace {

using batch_norm::Folded;
constexpr const char* kOp = "normops.batch_norm";

struct CpuBatchNorm : ChannelDrivers {
  static constexpr bool kFused = true;

  // NCHW in training, one channel at a time: the affine step (forward) or the
  // gradient (backward) runs right after the channel's reduction, while its
  // planes are still in cache, so x (and dy) are read from memory once. Needs
  // enough channels to keep every thread busy.
  static bool use_fused(const ChannelView& v) {
    return !v.rows && v.N * v.HW > 0 && v.C >= at::get_num_threads();
  }

  static std::tuple<Tensor, Tensor, Tensor> forward_fused(const ChannelView& v,
                                                           const OptTensor& weight,
                                                           const OptTensor& bias, double eps,
                                                           int act) {
    const auto acc = acc_dtype(v.x.scalar_type());
    Tensor out = like(v);
    Tensor mean = at::empty({v.C}, v.x.options().dtype(acc)), var = at::empty_like(mean);
    const auto w = param_as_double(weight, v.C, 1.0), b = param_as_double(bias, v.C, 0.0);
    dispatch_floating(v.x.scalar_type(), kOp, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      const auto& k = kernels<T>();
      const T* x = ptr<const T>(v.x);
      T* y = ptr<T>(out);
      const double* pw = w.data();
      const double* pb = b.data();
      A* pmean = ptr<A>(mean);
      A* pvar = ptr<A>(var);
      const bool stream = stream_output(out);
      at::parallel_for(0, v.C, grain_for(v.N * v.HW), [&](int64_t c0, int64_t c1) {
        const StreamFence fence{stream};
        for (int64_t c = c0; c < c1; ++c) {
          // Channel c: N runs of HW elements, C*HW apart.
          const int64_t off = c * v.HW, stride = v.C * v.HW;
          A mu, q;
          k.span_moments(x + off, v.HW, stride, v.N, c + 1 < c1 ? x + off + v.HW : nullptr, &mu, &q);
          const A var_c = q / A(v.N * v.HW);
          const A scale = A(pw[c] / std::sqrt(double(var_c) + eps));
          // Unbuffered, the runs in one call: a call per run of a 7x7 plane
          // cost as much as its values (bfloat16: the forward 1.4x slower).
          if (streams_through_buffer<T>(stream, v.HW, 1)) {
            write_output(k, stream, y + off, v.HW, stride, v.N, 1, [&](T* dst, int64_t o, int64_t n) {
              k.span_affine[act](x + off + o, dst, n, 0, 1, mu, scale, A(pb[c]));
            });
          } else {
            k.span_affine[act](x + off, y + off, v.HW, stride, v.N, mu, scale, A(pb[c]));
          }
          pmean[c] = mu;
          pvar[c] = var_c;
        }
      });
    });
    return {out, mean, var};
  }

  // The training backward by channel.
  static std::tuple<Tensor, Tensor, Tensor> backward_fused(
      const ChannelView& v, const Tensor& dy, const OptTensor& weight, const OptTensor& bias,
      const Tensor& mean, const Tensor& var, double eps, int act, std::array<bool, 3> mask) {
    const Folded f = fold(mean, var, weight, bias, eps, acc_dtype(v.x.scalar_type()));
    std::vector<double> sum_dy(static_cast<size_t>(v.C)), sum_dy_xmu(sum_dy);
    Tensor dx = like(v);
    const double count = double(v.N * v.HW);
    dispatch_floating(v.x.scalar_type(), kOp, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      const auto& k = kernels<T>();
      const T* x = ptr<const T>(v.x);
      const T* g = ptr<const T>(dy);
      T* d = ptr<T>(dx);
      const A* pm = ptr<A>(f.acc_mean);
      const A* ps = ptr<A>(f.acc_scale);
      const A* ph = ptr<A>(f.acc_bias);
      const double* pinv = ptr<double>(f.invstd);
      const double* pw = ptr<double>(f.weight);
      double* psd = sum_dy.data();
      double* psx = sum_dy_xmu.data();
      const bool stream = stream_output(dx);
      at::parallel_for(0, v.C, grain_for(v.N * v.HW), [&](int64_t c0, int64_t c1) {
        const StreamFence fence{stream};
        for (int64_t c = c0; c < c1; ++c) {
          const A m = pm[c], s = ps[c], h = ph[c];
          const int64_t off = c * v.HW, stride = v.C * v.HW;
          A sd, sx;
          k.span_grad_sums[act](g + off, x + off, v.HW, stride, v.N, m, s, h, &sd, &sx);
          psd[c] = sd;
          psx[c] = sx;
          const double inv = pinv[c], a = inv * pw[c];
          const A kb = A(centred_coefficient(a, inv, sx / count)), kc = A(-a * sd / count);
          if (streams_through_buffer<T>(stream, v.HW, 1)) {
            write_output(k, stream, d + off, v.HW, stride, v.N, 1, [&](T* dst, int64_t o, int64_t n) {
              k.span_grad_input[act](g + off + o, x + off + o, dst, n, 0, 1, A(a), kb, m, kc, s, h);
            });
          } else {
            k.span_grad_input[act](g + off, x + off, d + off, v.HW, stride, v.N, A(a), kb, m, kc,
                                   s, h);
          }
        }
      });
    });
    const double* inv = ptr<double>(f.invstd);
    for (int64_t c = 0; c < v.C; ++c) sum_dy_xmu[c] *= inv[c];  // now the weight's gradient
    return {dx, param_grad_from(v.x, mask[1], weight, sum_dy_xmu),
            param_grad_from(v.x, mask[2], bias, sum_dy)};
  }

  static Folded fold(const Tensor& mean, const Tensor& var, const OptTensor& weight,
                     const OptTensor& bias, double eps, at::ScalarType acc) {
    return fold_batch_norm(mean, var, weight, bias, eps, acc);
  }

  static std::tuple<Tensor, Tensor, Tensor> dx_coefficients(const Folded& f,
                                                            const Tensor& mean_dy,
                                                            const Tensor& mean_dy_xmu,
                                                            at::ScalarType acc) {
    const int64_t C = f.invstd.size(0);
    std::vector<double> md(static_cast<size_t>(C)), mx(static_cast<size_t>(C));
    read_as_double(mean_dy, md.data());
    read_as_double(mean_dy_xmu, mx.data());
    Tensor coef = at::empty({3, C}, f.invstd.options().dtype(acc));
    const double* inv = ptr<double>(f.invstd);
    const double* w = ptr<double>(f.weight);
    AT_DISPATCH_FLOATING_TYPES(acc, kOp, [&] {
      scalar_t* k = ptr<scalar_t>(coef);
      for (int64_t c = 0; c < C; ++c) {
        const double a = inv[c] * w[c];
        k[c] = static_cast<scalar_t>(a);
        // A zero statistic (eval: running statistics) gives a zero
        // coefficient: with an infinite weight, torch's a * dy, not inf * 0.
        k[C + c] = static_cast<scalar_t>(mx[c] == 0 ? 0.0 : centred_coefficient(a, inv[c], mx[c]));
        k[2 * C + c] = static_cast<scalar_t>(md[c] == 0 ? 0.0 : -a * md[c]);
      }
    });
    return {coef[0], coef[1], coef[2]};
  }

  static void update_running(const OptTensor& running_mean, const OptTensor& running_var,
                             const Tensor& mean, const Tensor& var, double momentum,
                             double unbias) {
    for (const auto& [running, stat, factor] :
         {std::make_tuple(running_mean, mean, 1.0), std::make_tuple(running_var, var, unbias)}) {
      if (!present(running)) continue;
      Tensor r = *running;
      std::vector<double> value(static_cast<size_t>(stat.numel()));
      read_as_double(stat, value.data());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), kOp, [&] {
        scalar_t* out = r.data_ptr<scalar_t>();
        for (int64_t c = 0; c < stat.numel(); ++c)
          out[c] = static_cast<scalar_t>(
              running_update(double(out[c]), value[c] * factor, momentum));
      });
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(normops, CPU, m) { batch_norm::register_kernels<CpuBatchNorm>(m); }

}  // namespace cpu
}  // namespace normops
