// Group norm, for any device, and instance norm as group norm with one
// channel per group: statistics per (n, group) over C/G channels and every
// spatial element, in the input's own layout (NCHW planes or channels_last
// rows, no copy), with a per-channel affine. Saves mean and rstd [N, G].
//
// GroupNormOps<B> is instantiated per backend (csrc/cpu/group_norm.cpp,
// csrc/cuda/group_norm.cu); B provides the channel drivers and, when
// kFused, a forward and backward of its own used where use_fused(view, G)
// says.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "channel_view.h"
#include "checks.h"

namespace normops {
namespace group_norm {

constexpr const char* kOp = "normops.group_norm";

inline void check_gn(const Tensor& input, int64_t groups, const OptTensor& weight,
                     const OptTensor& bias) {
  TORCH_CHECK(input.dim() >= 2, "Expected at least 2 dimensions for input tensor but received ",
              input.dim());
  check_input(input, 2, kOp);
  const int64_t C = input.size(1);
  TORCH_CHECK(groups > 0, kOp, ": num_groups must be positive, but got ", groups);
  TORCH_CHECK(C % groups == 0, "Expected number of channels in input to be divisible by ",
              "num_groups, but got input of shape ", input.sizes(), " and num_groups=", groups);
  check_param(input, weight, {C}, kOp, "weight");
  check_param(input, bias, {C}, kOp, "bias");
}

// Per-(n, c) copies of per-(n, g) values, as the drivers index.
inline Tensor per_channel(const Tensor& per_group, int64_t N, int64_t C, int64_t G) {
  return per_group.reshape({N, G, 1}).expand({N, G, C / G}).reshape({N * C}).contiguous();
}

// The forward with (mean, rstd) [N, G] and the parameters in double, filled
// by pass(v, G, out, w, b, eps, mean, rstd); returns them in the
// accumulation dtype.
template <class Pass>
std::tuple<Tensor, Tensor, Tensor> forward_in_double(const ChannelView& v, int64_t G,
                                                     const OptTensor& weight,
                                                     const OptTensor& bias, double eps,
                                                     Pass pass) {
  const auto acc = acc_dtype(v.x.scalar_type());
  const auto dopts = v.x.options().dtype(at::kDouble);
  Tensor out = like(v);
  Tensor mean = at::zeros({v.N, G}, dopts), rstd = at::zeros({v.N, G}, dopts);
  Tensor w = acc_vector(weight, v.C, dopts, 1.0), b = acc_vector(bias, v.C, dopts, 0.0);
  if (v.x.numel() > 0) pass(v, G, out, w, b, eps, mean, rstd);
  return {out, mean.to(acc), rstd.to(acc)};
}

// The backward in double: pass(v, G, dy, dx, mean, rstd, w, need_dx, sum_dy,
// sum_dy_xmu) fills dx and the per-(n, c) sums [N*C], from which the
// parameter gradients follow.
template <class Pass>
std::tuple<Tensor, Tensor, Tensor> backward_in_double(const ChannelView& v, int64_t G,
                                                      const Tensor& dy, const Tensor& mean,
                                                      const Tensor& rstd, const OptTensor& weight,
                                                      std::array<bool, 3> output_mask, Pass pass) {
  const int64_t N = v.N, C = v.C;
  const auto dopts = v.x.options().dtype(at::kDouble);
  Tensor mean_d = mean.to(at::kDouble).reshape({N, G}).contiguous();
  Tensor rstd_d = rstd.to(at::kDouble).reshape({N, G}).contiguous();
  Tensor w = acc_vector(weight, C, dopts, 1.0);
  Tensor grad_input = output_mask[0] ? like(v) : at::empty({0}, v.x.options());
  Tensor sum_dy = at::zeros({N * C}, dopts), sum_dy_xmu = at::zeros({N * C}, dopts);
  if (v.x.numel() > 0)
    pass(v, G, dy, grad_input, mean_d, rstd_d, w, output_mask[0], sum_dy, sum_dy_xmu);
  // Parameter gradients have the weight's dtype (the input's without one).
  return {grad_input, param_grad(v.x, output_mask[1], weight, [&] {
            return (sum_dy_xmu.view({N, C}) * per_channel(rstd_d, N, C, G).view({N, C})).sum(0);
          }),
          param_grad(v.x, output_mask[2], weight, [&] { return sum_dy.view({N, C}).sum(0); })};
}

template <class B>
struct GroupNormOps {
  // Forward through the drivers: per-(n, c) moments (HW values each) merged
  // into groups with Chan's formula for equal counts, in double.
  static void forward_by_pass(const ChannelView& v, int64_t G, const Tensor& out, const Tensor& w,
                              const Tensor& b, double eps, Tensor& mean, Tensor& rstd) {
    const int64_t N = v.N, C = v.C, D = C / G;
    const auto acc = acc_dtype(v.x.scalar_type());
    auto [mean_c, m2_c] = B::moments(v, /*per_sample=*/true);
    Tensor mc = mean_c.to(at::kDouble).view({N, G, D});
    mean = mc.mean(2);
    Tensor m2 = m2_c.to(at::kDouble).view({N, G, D}).sum(2) +
                (mc - mean.unsqueeze(2)).pow(2).sum(2) * double(v.HW);
    rstd = (m2 / double(D * v.HW) + eps).rsqrt();
    Tensor scale = per_channel(rstd, N, C, G).view({N, C}) * w.view({1, C});
    Tensor bias = b.to(acc).view({1, C}).expand({N, C}).reshape({N * C}).contiguous();
    B::affine(v, out, per_channel(mean, N, C, G).to(acc), scale.to(acc).reshape({N * C}), bias,
              /*per_sample=*/true, 0);
  }

  static std::tuple<Tensor, Tensor, Tensor> group_norm(const Tensor& input, int64_t groups,
                                                       const OptTensor& weight,
                                                       const OptTensor& bias, double eps) {
    check_gn(input, groups, weight, bias);
    ChannelView v = channel_view(input);
    if constexpr (B::kFused) {
      if (v.x.numel() > 0 && B::use_fused(v, groups))
        return B::forward_fused(v, groups, weight, bias, eps);
    }
    return forward_in_double(v, groups, weight, bias, eps, &forward_by_pass);
  }

  // dx = rstd*w*dy - rstd^3 * E[dy*w*(x-mean)] * (x-mean) - rstd * E[dy*w],
  // the expectations over each (n, group); through the drivers.
  static void backward_by_pass(const ChannelView& v, int64_t G, const Tensor& dy,
                               const Tensor& dx, const Tensor& mean, const Tensor& rstd,
                               const Tensor& w, bool need_dx, Tensor& sum_dy,
                               Tensor& sum_dy_xmu) {
    const int64_t N = v.N, C = v.C, D = C / G;
    const auto acc = acc_dtype(v.x.scalar_type());
    Tensor mean_c = per_channel(mean, N, C, G).to(acc);
    Tensor zeros = at::zeros({N * C}, v.x.options().dtype(acc));
    std::tie(sum_dy, sum_dy_xmu) =
        B::grad_sums(v, dy, mean_c, zeros, zeros, /*per_sample=*/true, 0);
    if (!need_dx) return;
    Tensor wv = w.view({1, C});
    const double count = double(D * v.HW);
    Tensor e1 = (sum_dy.view({N, C}) * wv).view({N, G, D}).sum(2) / count;
    Tensor e2 = (sum_dy_xmu.view({N, C}) * wv).view({N, G, D}).sum(2) / count;
    Tensor a = per_channel(rstd, N, C, G).view({N, C}) * wv;
    Tensor b = per_channel(-rstd.pow(3) * e2, N, C, G);
    Tensor c = per_channel(-rstd * e1, N, C, G);
    B::grad_input(v, dy, dx, a.reshape({N * C}).to(acc), b.to(acc), mean_c, c.to(acc), zeros,
                  zeros, /*per_sample=*/true, 0);
  }

  static std::tuple<Tensor, Tensor, Tensor> group_norm_backward(
      const Tensor& grad_out, const Tensor& input, int64_t groups, const Tensor& mean,
      const Tensor& rstd, const OptTensor& weight, std::array<bool, 3> output_mask) {
    check_gn(input, groups, weight, std::nullopt);
    check_same_device(input, grad_out, kOp, "grad_output");
    TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), kOp,
                ": expected grad_output to have the input's dtype ", input.scalar_type(),
                ", but got ", grad_out.scalar_type());
    const int64_t N = input.size(0), G = groups;
    TORCH_CHECK(mean.numel() == N * G && rstd.numel() == N * G, kOp,
                ": expected mean and rstd of shape [", N, ", ", G, "]");
    ChannelView v = channel_view(input);
    Tensor dy = match_layout(grad_out, v);
    if constexpr (B::kFused) {
      if (v.x.numel() > 0 && output_mask[0] && B::use_fused(v, G))
        return B::backward_fused(v, G, dy, mean, rstd, weight, output_mask);
    }
    return backward_in_double(v, G, dy, mean, rstd, weight, output_mask, &backward_by_pass);
  }
};

// Registers GroupNormOps<B> as a backend's kernels of the group-norm ops.
template <class B>
void register_kernels(torch::Library& m) {
  m.impl("group_norm", &GroupNormOps<B>::group_norm);
  m.impl("group_norm_backward", &GroupNormOps<B>::group_norm_backward);
}

}  // namespace group_norm
}  // namespace normops
