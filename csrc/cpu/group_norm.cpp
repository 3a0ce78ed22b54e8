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

// NCHW with enough groups for every thread: each (n, group) is one contiguous
// span of C/G planes, normalised (or differentiated) right after its
// reduction while it is still in cache: one read of x (and dy) from memory.
bool by_group(const ChannelView& v, int64_t G) {
  return !v.rows && v.N * v.HW > 0 && v.N * G >= at::get_num_threads();
}

// Forward by group; mean and rstd [N*G] in double.
template <typename T>
void forward_by_group(const ChannelView& v, int64_t G, const Tensor& out, const Tensor& w,
                      const Tensor& b, double eps, const Tensor& mean, const Tensor& rstd) {
  using A = acc_t<T>;
  const auto& k = kernels<T>();
  const int64_t D = v.C / G;
  const T* x = ptr<const T>(v.x);
  T* y = ptr<T>(out);
  at::parallel_for(0, v.N * G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t ng = g0; ng < g1; ++ng) {
      A gm, gq;
      k.span_moments(x + ng * D * v.HW, D * v.HW, 0, 1, &gm, &gq);
      const double r = 1.0 / std::sqrt(double(gq) / double(D * v.HW) + eps);
      for (int64_t d = 0; d < D; ++d) {
        const int64_t c = (ng % G) * D + d, p = ng * D + d;
        const A s = A(r * ptr<double>(w)[c]), h = A(ptr<double>(b)[c]);
        k.span_affine[0](x + p * v.HW, y + p * v.HW, v.HW, 0, 1, gm, s, h);
      }
      ptr<double>(mean)[ng] = gm;
      ptr<double>(rstd)[ng] = r;
    }
  });
}

// Forward through the shared drivers: per-(n, c) moments merged into groups.
template <typename T>
void forward_by_pass(const ChannelView& v, int64_t G, const Tensor& out, const Tensor& w,
                     const Tensor& b, double eps, const Tensor& mean, const Tensor& rstd) {
  using A = acc_t<T>;
  const int64_t N = v.N, C = v.C, D = C / G;
  const auto acc = acc_dtype(v.x.scalar_type());
  auto [mean_c, m2_c] = channel_moments<T>(v, /*per_sample=*/true);
  const A *pm = ptr<A>(mean_c), *pq = ptr<A>(m2_c);
  double *om = ptr<double>(mean), *orr = ptr<double>(rstd);
  for (int64_t ng = 0; ng < N * G; ++ng) {
    double count = 0, mu = 0, q = 0;
    for (int64_t d = 0; d < D; ++d)
      chan_merge(count, mu, q, double(v.HW), double(pm[ng * D + d]), double(pq[ng * D + d]));
    om[ng] = mu;
    orr[ng] = 1.0 / std::sqrt((count > 0 ? q / count : 0.0) + eps);
  }
  Tensor scale = per_channel(rstd, N, C, G).view({N, C}) * w.view({1, C});
  Tensor bias = b.to(acc).view({1, C}).expand({N, C}).reshape({N * C});
  channel_affine<T>(v, out, per_channel(mean, N, C, G).to(acc), scale.to(acc).reshape({N * C}),
                    bias.contiguous(), /*per_sample=*/true, 0);
}

std::tuple<Tensor, Tensor, Tensor> group_norm(const Tensor& input, int64_t groups,
                                              const OptTensor& weight, const OptTensor& bias,
                                              double eps) {
  check_gn(input, groups, weight, bias);
  ChannelView v = channel_view(input);
  const int64_t N = v.N, C = v.C, G = groups;
  const auto acc = acc_dtype(input.scalar_type());
  Tensor out = like(v);
  const auto dopts = input.options().dtype(at::kDouble);
  Tensor mean = at::zeros({N, G}, dopts), rstd = at::zeros({N, G}, dopts);
  Tensor w = acc_vector(weight, C, at::kDouble, 1.0), b = acc_vector(bias, C, at::kDouble, 0.0);
  if (v.x.numel() > 0) {
    dispatch_floating(input.scalar_type(), kOp, [&](auto tag) {
      using T = typename decltype(tag)::type;
      if (by_group(v, G)) {
        forward_by_group<T>(v, G, out, w, b, eps, mean, rstd);
      } else {
        forward_by_pass<T>(v, G, out, w, b, eps, mean, rstd);
      }
    });
  }
  return {out, mean.to(acc), rstd.to(acc)};
}

// Backward by group: fills dx and the per-(n, c) sums of dy and dy*(x-mean).
template <typename T>
void backward_by_group(const ChannelView& v, int64_t G, const Tensor& dy, const Tensor& dx,
                       const Tensor& mean, const Tensor& rstd, const Tensor& w,
                       const Tensor& sum_dy, const Tensor& sum_dy_xmu) {
  using A = acc_t<T>;
  const auto& k = kernels<T>();
  const int64_t D = v.C / G;
  const double count = double(D * v.HW);
  const T* x = ptr<const T>(v.x);
  const T* g = ptr<const T>(dy);
  T* d = ptr<T>(dx);
  at::parallel_for(0, v.N * G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t ng = g0; ng < g1; ++ng) {
      const A m = A(ptr<double>(mean)[ng]);
      const double r = ptr<double>(rstd)[ng];
      double e1 = 0, e2 = 0;
      for (int64_t j = 0; j < D; ++j) {
        const int64_t p = ng * D + j;
        const double wc = ptr<double>(w)[(ng % G) * D + j];
        A pd, px;
        k.span_grad_sums[0](g + p * v.HW, x + p * v.HW, v.HW, 0, 1, m, 1, 0, &pd, &px);
        ptr<double>(sum_dy)[p] = pd;
        ptr<double>(sum_dy_xmu)[p] = px;
        e1 += wc * pd;
        e2 += wc * px;
      }
      e1 /= count;
      e2 /= count;
      const A kb = A(-r * r * r * e2), kc = A(-r * e1);
      for (int64_t j = 0; j < D; ++j) {
        const int64_t p = ng * D + j;
        const A ka = A(r * ptr<double>(w)[(ng % G) * D + j]);
        k.span_grad_input[0](g + p * v.HW, x + p * v.HW, d + p * v.HW, v.HW, 0, 1, ka, kb, m, kc,
                             1, 0);
      }
    }
  });
}

// dx = rstd*w*dy - rstd^3 * E[dy*w*(x-mean)] * (x-mean) - rstd * E[dy*w], the
// expectations over each (n, group); through the shared drivers.
template <typename T>
void backward_by_pass(const ChannelView& v, int64_t G, const Tensor& dy, const Tensor& dx,
                      const Tensor& mean, const Tensor& rstd, const Tensor& w, bool need_dx,
                      Tensor& sum_dy, Tensor& sum_dy_xmu) {
  const int64_t N = v.N, C = v.C, D = C / G;
  const auto acc = acc_dtype(v.x.scalar_type());
  Tensor mean_c = per_channel(mean, N, C, G).to(acc);
  Tensor zeros = at::zeros({N * C}, v.x.options().dtype(acc));
  std::tie(sum_dy, sum_dy_xmu) =
      channel_grad_sums<T>(v, dy, mean_c, zeros, zeros, /*per_sample=*/true, 0);
  if (!need_dx) return;
  Tensor wv = w.view({1, C});
  const double count = double(D * v.HW);
  Tensor e1 = (sum_dy.view({N, C}) * wv).view({N, G, D}).sum(2) / count;
  Tensor e2 = (sum_dy_xmu.view({N, C}) * wv).view({N, G, D}).sum(2) / count;
  Tensor a = per_channel(rstd, N, C, G).view({N, C}) * wv;
  Tensor b = per_channel(-rstd.pow(3) * e2, N, C, G);
  Tensor c = per_channel(-rstd * e1, N, C, G);
  channel_grad_input<T>(v, dy, dx, a.reshape({N * C}).to(acc), b.to(acc), mean_c, c.to(acc), zeros,
                        zeros, /*per_sample=*/true, 0);
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
  const int64_t N = input.size(0), C = input.size(1), G = groups;
  TORCH_CHECK(mean.numel() == N * G && rstd.numel() == N * G, kOp,
              ": expected mean and rstd of shape [", N, ", ", G, "]");
  ChannelView v = channel_view(input);
  Tensor dy = match_layout(grad_out, v);
  const auto dopts = input.options().dtype(at::kDouble);
  Tensor mean_d = mean.to(at::kDouble).reshape({N, G}).contiguous();
  Tensor rstd_d = rstd.to(at::kDouble).reshape({N, G}).contiguous();
  Tensor w = acc_vector(weight, C, at::kDouble, 1.0);
  Tensor grad_input = output_mask[0] ? like(v) : at::empty({0}, input.options());
  Tensor sum_dy = at::zeros({N * C}, dopts), sum_dy_xmu = at::zeros({N * C}, dopts);
  if (v.x.numel() > 0) {
    dispatch_floating(input.scalar_type(), kOp, [&](auto tag) {
      using T = typename decltype(tag)::type;
      if (output_mask[0] && by_group(v, G)) {
        backward_by_group<T>(v, G, dy, grad_input, mean_d, rstd_d, w, sum_dy, sum_dy_xmu);
      } else {
        backward_by_pass<T>(v, G, dy, grad_input, mean_d, rstd_d, w, output_mask[0], sum_dy,
                            sum_dy_xmu);
      }
    });
  }
  // Parameter gradients have the weight's dtype (the input's without one).
  const auto param_dtype = present(weight) ? weight->scalar_type() : input.scalar_type();
  Tensor rstd_c = per_channel(rstd_d, N, C, G).view({N, C});
  Tensor grad_weight = output_mask[1] ? (sum_dy_xmu.view({N, C}) * rstd_c).sum(0).to(param_dtype)
                                      : at::empty({0}, input.options().dtype(param_dtype));
  Tensor grad_bias = output_mask[2] ? sum_dy.view({N, C}).sum(0).to(param_dtype)
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
