// Batch norm on the CPU: per-channel statistics over N and every spatial
// element, split into the steps SyncBatchNorm composes (stats, elemt,
// backward_reduce, backward_elemt) plus single-call forward and backward.
// Statistics are (mean, biased var) in the accumulation dtype; the backward
// recomputes the activation's mask from x, so only x is kept for it.
#include <torch/library.h>

#include <tuple>

#include "channel_norm.h"

namespace normops {
namespace cpu {
namespace {

constexpr const char* kOp = "normops.batch_norm";

void check_bn_input(const Tensor& input) {
  check_input(input, 2, kOp);
}

void check_stat(const Tensor& input, const Tensor& t, const char* name) {
  check_same_device(input, t, kOp, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == input.size(1), kOp, ": expected ", name,
              " of shape [", input.size(1), "], but got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), kOp, ": expected ", name,
              " to be floating point, but got ", t.scalar_type());
}

void check_affine(const Tensor& input, const OptTensor& weight, const OptTensor& bias) {
  const int64_t C = input.size(1);
  check_param(input, weight, {C}, kOp, "weight");
  check_param(input, bias, {C}, kOp, "bias");
}

// Per-channel constants of the normalisation with statistics (mean, var):
// y = (x - mean) * scale + bias with scale = invstd * weight. Double
// precision, and the accumulation dtype (acc_*) for the kernels.
struct Folded {
  Tensor mean, invstd, weight, acc_mean, acc_scale, acc_bias;
};

Folded fold(const Tensor& mean, const Tensor& var, const OptTensor& weight, const OptTensor& bias,
            double eps, at::ScalarType acc) {
  const int64_t C = mean.size(0);
  Folded f;
  f.mean = mean.to(at::kDouble).contiguous();
  Tensor v = var.to(at::kDouble).contiguous();
  Tensor w = acc_vector(weight, C, at::kDouble, 1.0);
  f.invstd = (v + eps).rsqrt();
  f.weight = w;
  f.acc_mean = f.mean.to(acc);
  f.acc_scale = (f.invstd * w).to(acc);
  f.acc_bias = acc_vector(bias, C, acc, 0.0);
  return f;
}

std::tuple<Tensor, Tensor> stats_impl(const ChannelView& v) {
  Tensor mean, var;
  dispatch_floating(v.x.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto mq = channel_moments<T>(v, /*per_sample=*/false);
    mean = mq.first;
    const int64_t count = v.N * v.HW;
    var = count > 0 ? mq.second / double(count) : mq.second;
  });
  return {mean, var};
}

Tensor elemt_impl(const ChannelView& v, const OptTensor& weight, const OptTensor& bias,
                  const Tensor& mean, const Tensor& var, double eps, int act) {
  Tensor out = like(v);
  const auto acc = acc_dtype(v.x.scalar_type());
  Folded f = fold(mean, var, weight, bias, eps, acc);
  dispatch_floating(v.x.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    channel_affine<T>(v, out, f.acc_mean, f.acc_scale, f.acc_bias, /*per_sample=*/false, act);
  });
  return out;
}

// NCHW in training, one channel at a time: the affine step (forward) or the
// gradient (backward) runs right after the channel's reduction, while its
// planes are still in cache, so x (and dy) are read from memory once. Needs
// enough channels to keep every thread busy.
bool by_channel(const ChannelView& v) {
  return !v.rows && v.N * v.HW > 0 && v.C >= at::get_num_threads();
}

std::tuple<Tensor, Tensor, Tensor> forward_by_channel(const ChannelView& v,
                                                      const OptTensor& weight,
                                                      const OptTensor& bias, double eps,
                                                      int act) {
  const auto acc = acc_dtype(v.x.scalar_type());
  Tensor out = like(v);
  Tensor mean = at::empty({v.C}, v.x.options().dtype(acc)), var = at::empty_like(mean);
  Tensor w = acc_vector(weight, v.C, at::kDouble, 1.0), b = acc_vector(bias, v.C, at::kDouble, 0.0);
  dispatch_floating(v.x.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const auto& k = kernels<T>();
    const T* x = ptr<const T>(v.x);
    T* y = ptr<T>(out);
    at::parallel_for(0, v.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        // Channel c: N runs of HW elements, C*HW apart.
        const int64_t off = c * v.HW, stride = v.C * v.HW;
        A mu, q;
        k.span_moments(x + off, v.HW, stride, v.N, &mu, &q);
        const A var_c = q / A(v.N * v.HW);
        const A scale = A(ptr<double>(w)[c] / std::sqrt(double(var_c) + eps));
        k.span_affine[act](x + off, y + off, v.HW, stride, v.N, mu, scale, A(ptr<double>(b)[c]));
        ptr<A>(mean)[c] = mu;
        ptr<A>(var)[c] = var_c;
      }
    });
  });
  return {out, mean, var};
}

// The training backward by channel; fills the per-channel sums (double).
Tensor backward_by_channel(const ChannelView& v, const Tensor& dy, const Folded& f, int act,
                           const Tensor& sum_dy, const Tensor& sum_dy_xmu) {
  Tensor dx = like(v);
  const double count = double(v.N * v.HW);
  dispatch_floating(v.x.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const auto& k = kernels<T>();
    const T* x = ptr<const T>(v.x);
    const T* g = ptr<const T>(dy);
    T* d = ptr<T>(dx);
    at::parallel_for(0, v.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const A m = ptr<A>(f.acc_mean)[c], s = ptr<A>(f.acc_scale)[c], h = ptr<A>(f.acc_bias)[c];
        const int64_t off = c * v.HW, stride = v.C * v.HW;
        A sd, sx;
        k.span_grad_sums[act](g + off, x + off, v.HW, stride, v.N, m, s, h, &sd, &sx);
        ptr<double>(sum_dy)[c] = sd;
        ptr<double>(sum_dy_xmu)[c] = sx;
        const double inv = ptr<double>(f.invstd)[c], a = inv * ptr<double>(f.weight)[c];
        k.span_grad_input[act](g + off, x + off, d + off, v.HW, stride, v.N, A(a),
                               A(-a * inv * inv * sx / count), m, A(-a * sd / count), s, h);
      }
    });
  });
  return dx;
}

std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
  check_bn_input(input);
  return stats_impl(channel_view(input));
}

Tensor batch_norm_elemt(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                        const Tensor& mean, const Tensor& var, double eps, int64_t activation) {
  check_bn_input(input);
  check_affine(input, weight, bias);
  check_stat(input, mean, "mean");
  check_stat(input, var, "var");
  const int act = act_index(activation);
  return elemt_impl(channel_view(input), weight, bias, mean, var, eps, act);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm(const Tensor& input, const OptTensor& weight,
                                              const OptTensor& bias,
                                              const OptTensor& running_mean,
                                              const OptTensor& running_var, bool training,
                                              double eps, int64_t activation) {
  check_bn_input(input);
  check_affine(input, weight, bias);
  const int act = act_index(activation);
  if (present(running_mean)) check_stat(input, *running_mean, "running_mean");
  if (present(running_var)) check_stat(input, *running_var, "running_var");
  TORCH_CHECK(training || (present(running_mean) && present(running_var)), kOp,
              ": running_mean and running_var must be given when training is False");
  ChannelView v = channel_view(input);
  if (training && by_channel(v)) return forward_by_channel(v, weight, bias, eps, act);
  if (training) {
    auto [mean, var] = stats_impl(v);
    return {elemt_impl(v, weight, bias, mean, var, eps, act), mean, var};
  }
  const auto opts = input.options().dtype(acc_dtype(input.scalar_type()));
  return {elemt_impl(v, weight, bias, *running_mean, *running_var, eps, act), at::empty({0}, opts),
          at::empty({0}, opts)};
}

// Sums (sum_dy, sum_dy_xmu) per channel, in double.
std::pair<Tensor, Tensor> reduce_impl(const ChannelView& v, const Tensor& dy, const Folded& f,
                                      int act) {
  std::pair<Tensor, Tensor> sums;
  dispatch_floating(v.x.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    sums = channel_grad_sums<T>(v, dy, f.acc_mean, f.acc_scale, f.acc_bias, /*per_sample=*/false,
                                act);
  });
  return sums;
}

// dx = invstd*w * (g - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu); with
// zero means (eval statistics) this is dx = invstd*w*g.
Tensor grad_input_impl(const ChannelView& v, const Tensor& dy, const Folded& f,
                       const Tensor& mean_dy, const Tensor& mean_dy_xmu, int act) {
  const int64_t C = v.C;
  const auto acc = acc_dtype(v.x.scalar_type());
  Tensor md = mean_dy.to(at::kDouble).contiguous(), mx = mean_dy_xmu.to(at::kDouble).contiguous();
  Tensor a = at::empty({C}, md.options()), b = at::empty({C}, md.options()),
         c = at::empty({C}, md.options());
  const double *pi = ptr<double>(f.invstd), *pw = ptr<double>(f.weight), *pmd = ptr<double>(md),
               *pmx = ptr<double>(mx);
  double *pa = ptr<double>(a), *pb = ptr<double>(b), *pc = ptr<double>(c);
  for (int64_t ch = 0; ch < C; ++ch) {
    pa[ch] = pi[ch] * pw[ch];
    pb[ch] = -pa[ch] * pi[ch] * pi[ch] * pmx[ch];
    pc[ch] = -pa[ch] * pmd[ch];
  }
  Tensor dx = like(v);
  Tensor aa = a.to(acc), bb = b.to(acc), cc = c.to(acc);
  dispatch_floating(v.x.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    channel_grad_input<T>(v, dy, dx, aa, bb, f.acc_mean, cc, f.acc_scale, f.acc_bias,
                          /*per_sample=*/false, act);
  });
  return dx;
}

void check_backward(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                    const Tensor& var, const OptTensor& weight, const OptTensor& bias) {
  check_bn_input(input);
  check_affine(input, weight, bias);
  check_stat(input, mean, "mean");
  check_stat(input, var, "var");
  check_same_device(input, grad_out, kOp, "grad_output");
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), kOp,
              ": expected grad_output to have the input's dtype ", input.scalar_type(), ", but got ",
              grad_out.scalar_type());
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& grad_out, const Tensor& input,
                                                      const Tensor& mean, const Tensor& var,
                                                      const OptTensor& weight,
                                                      const OptTensor& bias, double eps,
                                                      int64_t activation) {
  check_backward(grad_out, input, mean, var, weight, bias);
  const int act = act_index(activation);
  ChannelView v = channel_view(input);
  const auto acc = acc_dtype(input.scalar_type());
  Folded f = fold(mean, var, weight, bias, eps, acc);
  auto sums = reduce_impl(v, match_layout(grad_out, v), f, act);
  return {sums.first.to(acc), sums.second.to(acc)};
}

Tensor batch_norm_backward_elemt(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                 const Tensor& var, const OptTensor& weight,
                                 const OptTensor& bias, const Tensor& mean_dy,
                                 const Tensor& mean_dy_xmu, double eps, int64_t activation) {
  check_backward(grad_out, input, mean, var, weight, bias);
  check_stat(input, mean_dy, "mean_dy");
  check_stat(input, mean_dy_xmu, "mean_dy_xmu");
  const int act = act_index(activation);
  ChannelView v = channel_view(input);
  Folded f = fold(mean, var, weight, bias, eps, acc_dtype(input.scalar_type()));
  return grad_input_impl(v, match_layout(grad_out, v), f, mean_dy, mean_dy_xmu, act);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(
    const Tensor& grad_out, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const Tensor& mean, const Tensor& var, bool training, double eps, int64_t activation,
    std::array<bool, 3> output_mask) {
  check_backward(grad_out, input, mean, var, weight, bias);
  const int act = act_index(activation);
  ChannelView v = channel_view(input);
  Tensor dy = match_layout(grad_out, v);
  const auto acc = acc_dtype(input.scalar_type());
  Folded f = fold(mean, var, weight, bias, eps, acc);
  const int64_t C = v.C;
  const auto dopts = f.mean.options();
  Tensor sum_dy = at::zeros({C}, dopts), sum_dy_xmu = at::zeros({C}, dopts);
  Tensor grad_input;
  if (training && output_mask[0] && by_channel(v)) {
    grad_input = backward_by_channel(v, dy, f, act, sum_dy, sum_dy_xmu);
  } else {
    if (training || output_mask[1] || output_mask[2]) {
      std::tie(sum_dy, sum_dy_xmu) = reduce_impl(v, dy, f, act);
    }
    const int64_t count = v.N * v.HW;
    const bool batch_stats = training && count > 0;
    grad_input = !output_mask[0] ? at::empty({0}, input.options())
                                 : grad_input_impl(v, dy, f,
                                                   batch_stats ? sum_dy / double(count) : at::zeros({C}, dopts),
                                                   batch_stats ? sum_dy_xmu / double(count) : at::zeros({C}, dopts),
                                                   act);
  }
  // A parameter gradient has the parameter's dtype (the input's when absent).
  const auto param_grad = [&](bool wanted, const OptTensor& p, const Tensor& value) {
    const auto dt = present(p) ? p->scalar_type() : input.scalar_type();
    return wanted ? value.to(dt) : at::empty({0}, input.options().dtype(dt));
  };
  Tensor grad_weight = param_grad(output_mask[1], weight, sum_dy_xmu * f.invstd);
  Tensor grad_bias = param_grad(output_mask[2], bias, sum_dy);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(normops, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats);
  m.impl("batch_norm_elemt", &batch_norm_elemt);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt);
  m.impl("batch_norm", &batch_norm);
  m.impl("batch_norm_backward", &batch_norm_backward);
}

}  // namespace cpu
}  // namespace normops
