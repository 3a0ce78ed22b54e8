// Group norm on the CPU, and instance norm as group norm with one channel per
// group: statistics per (n, group) over C/G channels and every spatial
// element, in the input's own layout (NCHW planes or channels_last rows, no
// copy), with a per-channel affine. Saves mean and rstd of shape [N, G].
#include <torch/library.h>

#include <tuple>

#include "channel_norm.h"

namespace normops {
namespace cpu {
namespace {

constexpr const char* kOp = "normops.group_norm";

void check_gn(const Tensor& input, int64_t groups, const OptTensor& weight, const OptTensor& bias) {
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

// Per-(n, c) copies of per-(n, g) values, as the plane and row drivers index.
Tensor per_channel(const Tensor& per_group, int64_t N, int64_t C, int64_t G) {
  return per_group.view({N, G, 1}).expand({N, G, C / G}).reshape({N * C}).contiguous();
}

std::tuple<Tensor, Tensor, Tensor> group_norm(const Tensor& input, int64_t groups,
                                              const OptTensor& weight, const OptTensor& bias,
                                              double eps) {
  check_gn(input, groups, weight, bias);
  ChannelView v = channel_view(input);
  const int64_t N = v.N, C = v.C, G = groups, D = C / G;
  const auto acc = acc_dtype(input.scalar_type());
  Tensor out = like(v);
  Tensor mean_g, rstd_g;
  dispatch_floating(input.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    auto [mean_c, m2_c] = channel_moments<T>(v, /*per_sample=*/true);
    // Merge the D channels of each group (each HW values) in double.
    mean_g = at::empty({N, G}, input.options().dtype(at::kDouble));
    Tensor var_g = at::empty({N, G}, mean_g.options());
    const A *pm = ptr<A>(mean_c), *pq = ptr<A>(m2_c);
    double *om = ptr<double>(mean_g), *ov = ptr<double>(var_g);
    for (int64_t ng = 0; ng < N * G; ++ng) {
      double count = 0, mu = 0, q = 0;
      for (int64_t d = 0; d < D; ++d)
        chan_merge(count, mu, q, double(v.HW), double(pm[ng * D + d]), double(pq[ng * D + d]));
      om[ng] = mu;
      ov[ng] = count > 0 ? q / count : 0.0;
    }
    rstd_g = (var_g + eps).rsqrt();
    Tensor w = acc_vector(weight, C, at::kDouble, 1.0).view({1, C});
    Tensor scale = per_channel(rstd_g, N, C, G).view({N, C}) * w;
    Tensor b = acc_vector(bias, C, acc, 0.0).view({1, C}).expand({N, C}).reshape({N * C});
    channel_affine<T>(v, out, per_channel(mean_g, N, C, G).to(acc), scale.to(acc).reshape({N * C}),
                      b.contiguous(), /*per_sample=*/true, 0);
  });
  return {out, mean_g.to(acc), rstd_g.to(acc)};
}

std::tuple<Tensor, Tensor, Tensor> group_norm_backward(const Tensor& grad_out,
                                                       const Tensor& input, int64_t groups,
                                                       const Tensor& mean, const Tensor& rstd,
                                                       const OptTensor& weight,
                                                       std::array<bool, 3> output_mask) {
  check_gn(input, groups, weight, std::nullopt);
  check_same_device(input, grad_out, kOp, "grad_output");
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), kOp,
              ": expected grad_output to have the input's dtype ", input.scalar_type(),
              ", but got ", grad_out.scalar_type());
  const int64_t N = input.size(0), C = input.size(1), G = groups, D = C / G;
  TORCH_CHECK(mean.numel() == N * G && rstd.numel() == N * G, kOp,
              ": expected mean and rstd of shape [", N, ", ", G, "]");
  ChannelView v = channel_view(input);
  Tensor dy = match_layout(grad_out, v);
  const auto acc = acc_dtype(input.scalar_type());
  Tensor mean_d = mean.to(at::kDouble).reshape({N, G});
  Tensor rstd_d = rstd.to(at::kDouble).reshape({N, G});
  Tensor mean_c = per_channel(mean_d, N, C, G);
  Tensor zeros = at::zeros({N * C}, input.options().dtype(acc));
  Tensor sum_dy, sum_dy_xmu;
  dispatch_floating(input.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    std::tie(sum_dy, sum_dy_xmu) =
        channel_grad_sums<T>(v, dy, mean_c.to(acc), zeros, zeros, /*per_sample=*/true, 0);
  });
  sum_dy = sum_dy.view({N, C});
  sum_dy_xmu = sum_dy_xmu.view({N, C});
  Tensor rstd_c = per_channel(rstd_d, N, C, G).view({N, C});
  Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) {
    Tensor w = acc_vector(weight, C, at::kDouble, 1.0).view({1, C});
    const double count = double(D * v.HW);
    // Per (n, g): E[dy*w] and E[dy*w*(x - mean)] over the group.
    Tensor e1 = (sum_dy * w).view({N, G, D}).sum(2) / count;
    Tensor e2 = (sum_dy_xmu * w).view({N, G, D}).sum(2) / count;
    Tensor a = rstd_c * w;
    Tensor b = per_channel(-rstd_d.pow(3) * e2, N, C, G);
    Tensor c = per_channel(-rstd_d * e1, N, C, G);
    grad_input = like(v);
    dispatch_floating(input.scalar_type(), kOp, [&](auto tag) {
      using T = typename decltype(tag)::type;
      channel_grad_input<T>(v, dy, grad_input, a.reshape({N * C}).to(acc), b.to(acc),
                            mean_c.to(acc), c.to(acc), zeros, zeros, /*per_sample=*/true, 0);
    });
  } else {
    grad_input = at::empty({0}, input.options());
  }
  // Parameter gradients have the weight's dtype (the input's without one).
  const auto param_dtype = present(weight) ? weight->scalar_type() : input.scalar_type();
  grad_weight = output_mask[1] ? (sum_dy_xmu * rstd_c).sum(0).to(param_dtype)
                               : at::empty({0}, input.options().dtype(param_dtype));
  grad_bias = output_mask[2] ? sum_dy.sum(0).to(param_dtype)
                             : at::empty({0}, input.options().dtype(param_dtype));
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(normops, CPU, m) {
  m.impl("group_norm", &group_norm);
  m.impl("group_norm_backward", &group_norm_backward);
}

}  // namespace cpu
}  // namespace normops
