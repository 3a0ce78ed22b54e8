// Batch norm, for any device: per-channel statistics over N and every
// spatial element, split into the steps SyncBatchNorm composes (stats, elemt,
// backward_reduce, backward_elemt) plus single-call forward and backward.
// Statistics are (mean, biased var) in the accumulation dtype; the backward
// recomputes the activation's mask from x, so only x is kept for it.
//
// BatchNormOps<B> is instantiated per backend (csrc/cpu/batch_norm.cpp,
// csrc/cuda/batch_norm.cu). B provides the channel drivers (moments, affine,
// grad_sums, grad_input; see csrc/cpu/channel_norm.h), fold and
// dx_coefficients (the per-channel constants), update_running, and, when
// kFused, a training forward and backward of its own, used where
// use_fused(view) says.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "channel_view.h"
#include "checks.h"

namespace normops {
namespace batch_norm {

constexpr const char* kOp = "normops.batch_norm";

inline void check_bn_input(const Tensor& input) {
  check_input(input, 2, kOp);
}

inline void check_stat(const Tensor& input, const Tensor& t, const char* name) {
  check_vector(input, t, input.size(1), kOp, name);
}

inline void check_affine(const Tensor& input, const OptTensor& weight, const OptTensor& bias) {
  const int64_t C = input.size(1);
  check_param(input, weight, {C}, kOp, "weight");
  check_param(input, bias, {C}, kOp, "bias");
  check_one_param_dtype(input, {{"weight", &weight}, {"bias", &bias}}, kOp);
}

// Per-channel constants of the normalisation with statistics (mean, var):
// y = (x - mean) * scale + bias with scale = invstd * weight. Double
// precision, and the accumulation dtype (acc_*) for the kernels. acc_shift,
// where a backend defines it, is bias - mean * scale for the folded form
// y = x * scale + shift, one array fewer to read (see B::affine).
struct Folded {
  Tensor mean, invstd, weight, acc_mean, acc_scale, acc_bias, acc_shift;
};

// The coefficients of dx = a * g + b * (x - mean) + c in the accumulation
// dtype: a = invstd * w, b = -a * invstd^2 * mean_dy_xmu, c = -a * mean_dy,
// through ATen ops (dx_coefficients() of a backend without its own).
inline std::tuple<Tensor, Tensor, Tensor> dx_coefficients_aten(const Folded& f,
                                                              const Tensor& mean_dy,
                                                              const Tensor& mean_dy_xmu,
                                                              at::ScalarType acc) {
  Tensor a = f.invstd * f.weight;
  // Tensor form of centred_coefficient (csrc/moments.h): one invstd at a
  // time. A zero statistic (eval: running statistics) gives a zero
  // coefficient: with an infinite weight, torch's a * dy, not inf * 0.
  const Tensor mx = mean_dy_xmu.to(at::kDouble), md = mean_dy.to(at::kDouble);
  Tensor b = at::where(mx == 0, 0.0, -a * (f.invstd * (f.invstd * mx)));
  Tensor c = at::where(md == 0, 0.0, -a * md);
  return {a.to(acc), b.to(acc), c.to(acc)};
}

inline void check_running(const Tensor& mean, const OptTensor& running, const char* name) {
  if (!present(running)) return;
  check_vector(mean, *running, mean.numel(), kOp, name);
  TORCH_CHECK(at::has_internal_overlap(*running) != at::MemOverlap::Yes, kOp, ": ", name,
              " is updated in place, but some of its elements share memory (an expanded "
              "tensor?)");
}

// A strided running buffer (a slice of a larger one) is updated through a
// dense copy, written back: the kernels index it densely.
inline OptTensor dense_running(const OptTensor& running) {
  return present(running) && !running->is_contiguous() ? OptTensor(running->contiguous())
                                                         : running;
}

template <class B>
struct BatchNormOps {
  static std::tuple<Tensor, Tensor> stats_impl(const ChannelView& v) {
    auto [mean, m2] = B::moments(v, /*per_sample=*/false);
    const int64_t count = v.N * v.HW;
    return {mean, count > 0 ? m2 / double(count) : m2};
  }

  static Tensor elemt_impl(const ChannelView& v, const OptTensor& weight, const OptTensor& bias,
                    const Tensor& mean, const Tensor& var, double eps, int act) {
    Tensor out = like(v);
    const auto acc = acc_dtype(v.x.scalar_type());
    Folded f = B::fold(mean, var, weight, bias, eps, acc);
    // With an activation the backward recomputes the pre-activation centred
    // to mask dy; the forward then stays centred too, so the mask matches
    // its output bit for bit.
    if (act == 0 && f.acc_shift.defined())
      B::affine(v, out, Tensor(), f.acc_scale, f.acc_shift, /*per_sample=*/false, act);
    else
      B::affine(v, out, f.acc_mean, f.acc_scale, f.acc_bias, /*per_sample=*/false, act);
    return out;
  }

  static std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
    check_bn_input(input);
    return stats_impl(channel_view(input));
  }

  static Tensor batch_norm_elemt(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                          const Tensor& mean, const Tensor& var, double eps, int64_t activation) {
    check_bn_input(input);
    check_affine(input, weight, bias);
    check_stat(input, mean, "mean");
    check_stat(input, var, "var");
    const int act = act_index(activation);
    return elemt_impl(channel_view(input), weight, bias, mean, var, eps, act);
  }

  static std::tuple<Tensor, Tensor, Tensor> batch_norm(const Tensor& input, const OptTensor& weight,
                                                const OptTensor& bias,
                                                const OptTensor& running_mean,
                                                const OptTensor& running_var, bool training,
                                                double eps, int64_t activation) {
    check_bn_input(input);
    check_affine(input, weight, bias);
    const int act = act_index(activation);
    // The running statistics follow the parameters' dtype rule, as torch's.
    check_param(input, running_mean, {input.size(1)}, kOp, "running_mean");
    check_param(input, running_var, {input.size(1)}, kOp, "running_var");
    check_one_param_dtype(input,
                          {{"weight", &weight}, {"bias", &bias}, {"running_mean", &running_mean},
                           {"running_var", &running_var}},
                          kOp);
    TORCH_CHECK(training || (present(running_mean) && present(running_var)), kOp,
                ": running_mean and running_var must be given when training is False");
    ChannelView v = channel_view(input);
    if constexpr (B::kFused) {
      if (training && B::use_fused(v)) return B::forward_fused(v, weight, bias, eps, act);
    }
    if (training) {
      auto [mean, var] = stats_impl(v);
      return {elemt_impl(v, weight, bias, mean, var, eps, act), mean, var};
    }
    const auto opts = input.options().dtype(acc_dtype(input.scalar_type()));
    return {elemt_impl(v, weight, bias, *running_mean, *running_var, eps, act), at::empty({0}, opts),
            at::empty({0}, opts)};
  }

  // Sums (sum_dy, sum_dy_xmu) per channel, in double.
  static std::pair<Tensor, Tensor> reduce_impl(const ChannelView& v, const Tensor& dy, const Folded& f,
                                        int act) {
    return B::grad_sums(v, dy, f.acc_mean, f.acc_scale, f.acc_bias, /*per_sample=*/false, act);
  }

  // dx = invstd*w * (g - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu); with
  // zero means (eval statistics) this is dx = invstd*w*g.
  static Tensor grad_input_impl(const ChannelView& v, const Tensor& dy, const Folded& f,
                         const Tensor& mean_dy, const Tensor& mean_dy_xmu, int act) {
    auto [a, b, c] = B::dx_coefficients(f, mean_dy, mean_dy_xmu, acc_dtype(v.x.scalar_type()));
    Tensor dx = like(v);
    B::grad_input(v, dy, dx, a, b, f.acc_mean, c, f.acc_scale, f.acc_bias, /*per_sample=*/false,
                  act);
    return dx;
  }

  static void check_backward(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
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

  static std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& grad_out, const Tensor& input,
                                                        const Tensor& mean, const Tensor& var,
                                                        const OptTensor& weight,
                                                        const OptTensor& bias, double eps,
                                                        int64_t activation) {
    check_backward(grad_out, input, mean, var, weight, bias);
    const int act = act_index(activation);
    ChannelView v = channel_view(input);
    const auto acc = acc_dtype(input.scalar_type());
    Folded f = B::fold(mean, var, weight, bias, eps, acc);
    auto sums = reduce_impl(v, match_layout(grad_out, v), f, act);
    return {sums.first.to(acc), sums.second.to(acc)};
  }

  static Tensor batch_norm_backward_elemt(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                   const Tensor& var, const OptTensor& weight,
                                   const OptTensor& bias, const Tensor& mean_dy,
                                   const Tensor& mean_dy_xmu, double eps, int64_t activation) {
    check_backward(grad_out, input, mean, var, weight, bias);
    check_stat(input, mean_dy, "mean_dy");
    check_stat(input, mean_dy_xmu, "mean_dy_xmu");
    const int act = act_index(activation);
    ChannelView v = channel_view(input);
    Folded f = B::fold(mean, var, weight, bias, eps, acc_dtype(input.scalar_type()));
    return grad_input_impl(v, match_layout(grad_out, v), f, mean_dy, mean_dy_xmu, act);
  }

  static std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(
      const Tensor& grad_out, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
      const Tensor& mean, const Tensor& var, bool training, double eps, int64_t activation,
      std::array<bool, 3> output_mask) {
    check_backward(grad_out, input, mean, var, weight, bias);
    const int act = act_index(activation);
    ChannelView v = channel_view(input);
    Tensor dy = match_layout(grad_out, v);
    if constexpr (B::kFused) {
      if (training && output_mask[0] && B::use_fused(v))
        return B::backward_fused(v, dy, weight, bias, mean, var, eps, act, output_mask);
    }
    const auto acc = acc_dtype(input.scalar_type());
    Folded f = B::fold(mean, var, weight, bias, eps, acc);
    const int64_t C = v.C;
    const auto dopts = f.mean.options();
    Tensor sum_dy = at::zeros({C}, dopts), sum_dy_xmu = at::zeros({C}, dopts);
    if (training || output_mask[1] || output_mask[2]) {
      std::tie(sum_dy, sum_dy_xmu) = reduce_impl(v, dy, f, act);
    }
    const int64_t count = v.N * v.HW;
    const bool batch_stats = training && count > 0;
    Tensor grad_input =
        !output_mask[0]
            ? at::empty({0}, input.options())
            : grad_input_impl(v, dy, f, batch_stats ? sum_dy / double(count) : at::zeros({C}, dopts),
                              batch_stats ? sum_dy_xmu / double(count) : at::zeros({C}, dopts), act);
    return {grad_input,
            param_grad(input, output_mask[1], weight, [&] { return sum_dy_xmu * f.invstd; }),
            param_grad(input, output_mask[2], bias, [&] { return sum_dy; })};
  }

  // running = (1 - momentum) * running + momentum * statistic, with the
  // variance made unbiased (count / (count - 1)); nothing for an empty batch.
  static void update_running_stats(const OptTensor& running_mean, const OptTensor& running_var,
                                   const Tensor& mean, const Tensor& var, double momentum,
                                   int64_t count) {
    TORCH_CHECK(mean.dim() == 1 && var.sizes() == mean.sizes() &&
                    var.scalar_type() == mean.scalar_type() && mean.is_contiguous() &&
                    var.is_contiguous() && at::isFloatingType(mean.scalar_type()),
                kOp, ": expected mean and var to be contiguous floating point vectors of one "
                "shape and dtype, but got ", mean.sizes(), " and ", var.sizes());
    check_same_device(mean, var, kOp, "var");
    check_running(mean, running_mean, "running_mean");
    check_running(mean, running_var, "running_var");
    if (count <= 0 || mean.numel() == 0 || (!present(running_mean) && !present(running_var)))
      return;
    const double unbias = double(count) / double(std::max<int64_t>(count - 1, 1));
    const OptTensor dense_mean = dense_running(running_mean), dense_var = dense_running(running_var);
    B::update_running(dense_mean, dense_var, mean, var, momentum, unbias);
    // A kernel's write is invisible to autograd: bump the version counters as
    // an ATen in-place op does (caches keyed on them, saved-tensor checks).
    // Buffers made under torch.inference_mode have none, and torch's batch
    // norm updates them outside that mode too: written back as in it.
    for (const auto& [t, dense] : {std::make_pair(&running_mean, &dense_mean),
                                   std::make_pair(&running_var, &dense_var)}) {
      if (!present(*t)) continue;
      const bool inference = (*t)->is_inference();
      std::optional<c10::InferenceMode> as_inference;
      if (inference) as_inference.emplace();
      if (!(*t)->is_same(**dense)) (*t)->copy_(**dense);
      if (!inference) (*t)->unsafeGetTensorImpl()->bump_version();
    }
  }

};

// Registers BatchNormOps<B> as a backend's kernels of the batch-norm ops.
template <class B>
void register_kernels(torch::Library& m) {
  using Ops = BatchNormOps<B>;
  m.impl("batch_norm_stats", &Ops::batch_norm_stats);
  m.impl("batch_norm_elemt", &Ops::batch_norm_elemt);
  m.impl("batch_norm_backward_reduce", &Ops::batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &Ops::batch_norm_backward_elemt);
  m.impl("batch_norm", &Ops::batch_norm);
  m.impl("batch_norm_backward", &Ops::batch_norm_backward);
  m.impl("update_running_stats", &Ops::update_running_stats);
}

}  // namespace batch_norm
}  // namespace normops
