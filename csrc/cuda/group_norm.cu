// Group and instance norm's CUDA backend: the CUDA channel drivers under the
// shared op logic (csrc/group_norm_impl.h), with a forward and backward of
// their own, each a few kernels:
//   forward:  partial moments (NCHW: per (n, group) span and row split;
//             channels_last: per (n, c) column and row split) -> merge per
//             (n, group), mean, rstd and per-(n, c) constants -> affine
//   backward: per-(n, c) sums of dy and dy * (x - mean) -> per-(n, group)
//             dx coefficients and the parameter gradients -> dx
#include <torch/library.h>

#include "../group_norm_impl.h"
#include "channel_norm.cuh"

namespace normops {
namespace cuda {
namespace {

// Moments of `splits` consecutive pieces of each span of `len` contiguous
// values: grid (spans, splits); writes [spans, splits] partials.
template <typename T, typename A>
__global__ void span_split_moments_kernel(const T* __restrict__ x, int64_t len,
                                          A* __restrict__ pn, A* __restrict__ pmean,
                                          A* __restrict__ pm2) {
  const int64_t span = blockIdx.x, s = blockIdx.y, splits = gridDim.y;
  const int64_t j0 = len * s / splits, j1 = len * (s + 1) / splits;
  A n, mu, q;
  block_span_moments(x + span * len + j0, j1 - j0, n, mu, q);
  if (threadIdx.x == 0) {
    const int64_t o = span * splits + s;
    pn[o] = n;
    pmean[o] = mu;
    pm2[o] = q;
  }
}

// Per (n, g): merges the partials (NCHW: [N*G, splits]; channels_last:
// [N, splits, C], D channels of the group), writes mean and rstd [N*G] and
// consts = [mean, scale, bias] x N*C for the affine step.
template <typename A>
__global__ void forward_finalize_kernel(const A* __restrict__ pn, const A* __restrict__ pmean,
                                        const A* __restrict__ pm2, bool rows, int64_t splits,
                                        int64_t N, int64_t G, int64_t D,
                                        const A* __restrict__ weight, const A* __restrict__ bias,
                                        double eps, A* __restrict__ mean, A* __restrict__ rstd,
                                        A* __restrict__ consts) {
  const int64_t C = G * D;
  for (int64_t ng = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; ng < N * G;
       ng += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = ng / G, g = ng % G;
    A cnt = 0, mu = 0, q = 0;
    if (rows) {
      for (int64_t s = 0; s < splits; ++s)
        for (int64_t d = 0; d < D; ++d) {
          const int64_t o = (n * splits + s) * C + g * D + d;
          chan_merge(cnt, mu, q, pn[o], pmean[o], pm2[o]);
        }
    } else {
      for (int64_t s = 0; s < splits; ++s)
        chan_merge(cnt, mu, q, pn[ng * splits + s], pmean[ng * splits + s], pm2[ng * splits + s]);
    }
    const double r = 1.0 / sqrt(static_cast<double>(q) / static_cast<double>(cnt) + eps);
    mean[ng] = mu;
    rstd[ng] = static_cast<A>(r);
    for (int64_t d = 0; d < D; ++d) {
      const int64_t c = g * D + d, k = n * C + c;
      consts[k] = mu;
      consts[N * C + k] = static_cast<A>(r * (weight ? static_cast<double>(weight[c]) : 1.0));
      consts[2 * N * C + k] = bias ? bias[c] : A(0);
    }
  }
}

// From the per-(n, c) sums [N, splits, C] of dy and dy * (x - mean):
//   thread i < N*G, for (n, g): coef = [a, b, c, mean] x N*C of
//     dx = a * dy + b * (x - mean) + c, with a = rstd * w,
//     b = -rstd^3 * E[w dy (x - mean)], c = -rstd * E[w dy] over the group;
//   thread i < C: grad_weight = sum_n sum_dy_xmu * rstd, grad_bias = sum_n sum_dy.
template <typename A>
__global__ void backward_finalize_kernel(const A* __restrict__ psum_dy,
                                         const A* __restrict__ psum_dy_xmu, int64_t splits,
                                         int64_t N, int64_t G, int64_t D, double count,
                                         const A* __restrict__ mean, const A* __restrict__ rstd,
                                         const A* __restrict__ weight, A* __restrict__ coef, A* __restrict__ grad_weight,
                                         A* __restrict__ grad_bias) {
  const int64_t C = G * D;
  const auto sums = [&](int64_t n, int64_t c, double& sd, double& sx) {
    sd = 0;
    sx = 0;
    for (int64_t s = 0; s < splits; ++s) {
      sd += static_cast<double>(psum_dy[(n * splits + s) * C + c]);
      sx += static_cast<double>(psum_dy_xmu[(n * splits + s) * C + c]);
    }
  };
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < max(N * G, C);
       i += int64_t(gridDim.x) * blockDim.x) {
    if (i < N * G) {
      const int64_t n = i / G, g = i % G;
      const double r = static_cast<double>(rstd[i]);
      double e1 = 0, e2 = 0, sd, sx;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t c = g * D + d;
        const double w = weight ? static_cast<double>(weight[c]) : 1.0;
        sums(n, c, sd, sx);
        e1 += w * sd;
        e2 += w * sx;
      }
      const A kb = static_cast<A>(centred_coefficient(r, r, e2 / count)),
              kc = static_cast<A>(-r * e1 / count);
      for (int64_t d = 0; d < D; ++d) {
        const int64_t c = g * D + d, k = n * C + c;
        coef[k] = static_cast<A>(r * (weight ? static_cast<double>(weight[c]) : 1.0));
        coef[N * C + k] = kb;
        coef[2 * N * C + k] = kc;
        coef[3 * N * C + k] = mean[i];
      }
    }
    if (i < C) {
      double gw = 0, gb = 0, sd, sx;
      for (int64_t n = 0; n < N; ++n) {
        sums(n, i, sd, sx);
        gw += sx * static_cast<double>(rstd[n * G + i / D]);
        gb += sd;
      }
      grad_weight[i] = static_cast<A>(gw);
      grad_bias[i] = static_cast<A>(gb);
    }
  }
}

struct CudaGroupNorm {
  static std::tuple<Tensor, Tensor, Tensor> forward(const ChannelView& v, int64_t G,
                                                    const OptTensor& weight,
                                                    const OptTensor& bias, double eps) {
    const c10::cuda::CUDAGuard guard(v.x.device());
    const auto acc = acc_dtype(v.x.scalar_type());
    const auto opts = v.x.options().dtype(acc);
    const int64_t N = v.N, C = v.C, D = C / G;
    if (v.x.numel() == 0) return {like(v), at::zeros({N, G}, opts), at::zeros({N, G}, opts)};
    const int64_t splits = v.rows ? row_splits(v.HW, C, N) : span_splits(N * G, D * v.HW);
    Tensor out = like(v);
    Tensor mean = at::empty({N, G}, opts), rstd = at::empty({N, G}, opts);
    Tensor partial = at::empty({3, v.rows ? N * splits * C : N * G * splits}, opts);
    Tensor consts = at::empty({3, N * C}, opts);
    Tensor w = acc_param(weight, acc), b = acc_param(bias, acc);
    auto stream = c10::cuda::getCurrentCUDAStream();
    NORMOPS_CUDA_DISPATCH(v.x.scalar_type(), "normops_group_norm_cuda", [&] {
      using T = scalar_t;
      using A = acc_t<T>;
      const auto p = rows_of<A, 3>(partial);
      A *pn = p[0], *pm = p[1], *pq = p[2];
      if (v.rows) {
        launch_column_moments(v.x.const_data_ptr<T>(), v.HW, C, splits, N, pn, pm, pq);
      } else {
        span_split_moments_kernel<T, A>
            <<<dim3(static_cast<unsigned>(N * G), static_cast<unsigned>(splits)), kBlock, 0, stream>>>(
                v.x.const_data_ptr<T>(), D * v.HW, pn, pm, pq);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      forward_finalize_kernel<A><<<blocks_for(N * G), kBlock, 0, stream>>>(
          pn, pm, pq, v.rows, splits, N, G, D, ptr_or_null<A>(w), ptr_or_null<A>(b), eps,
          mean.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>(), consts.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      channel_affine<T>(v, out, consts[0], consts[1], consts[2], /*per_sample=*/true, 0);
    });
    return {out, mean, rstd};
  }

  static std::tuple<Tensor, Tensor, Tensor> backward(const ChannelView& v, int64_t G,
                                                     const Tensor& dy, const Tensor& mean,
                                                     const Tensor& rstd, const OptTensor& weight,
                                                     std::array<bool, 3> output_mask) {
    const c10::cuda::CUDAGuard guard(v.x.device());
    const auto acc = acc_dtype(v.x.scalar_type());
    const auto opts = v.x.options().dtype(acc);
    const int64_t N = v.N, C = v.C, D = C / G;
    if (v.x.numel() == 0) {
      Tensor zeros = at::zeros({C}, opts);
      return {output_mask[0] ? like(v) : at::empty({0}, v.x.options()),
              param_grad(v.x, output_mask[1], weight, [&] { return zeros; }),
              param_grad(v.x, output_mask[2], weight, [&] { return zeros; })};
    }
    const int64_t splits = v.rows ? row_splits(v.HW, C, N) : 1;
    Tensor m = mean.to(acc).contiguous(), r = rstd.to(acc).contiguous();
    Tensor partial = at::empty({2, N * splits * C}, opts);
    Tensor coef = at::empty({4, N * C}, opts);  // a, b, c, and the mean per (n, c)
    Tensor grad_weight = at::empty({C}, opts), grad_bias = at::empty({C}, opts);
    Tensor w = acc_param(weight, acc);
    Tensor dx = output_mask[0] ? like(v) : at::empty({0}, v.x.options());
    auto stream = c10::cuda::getCurrentCUDAStream();
    NORMOPS_CUDA_DISPATCH(v.x.scalar_type(), "normops_group_norm_backward_cuda", [&] {
      using T = scalar_t;
      using A = acc_t<T>;
      const auto p = rows_of<A, 2>(partial);
      A *psd = p[0], *psx = p[1];
      const GroupMean<A> consts{m.const_data_ptr<A>(), D};
      if (v.rows) {
        launch_column_grad_sums<Act::None>(dy.const_data_ptr<T>(), v.x.const_data_ptr<T>(), v.HW, C,
                                           splits, N, consts, psd, psx);
      } else {
        plane_grad_sums_kernel<Act::None, T, A>
            <<<static_cast<unsigned>(grid_for(N * C)), kBlock, 0, stream>>>(
                dy.const_data_ptr<T>(), v.x.const_data_ptr<T>(), N * C, v.HW, N * C, consts, psd,
                psx);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      backward_finalize_kernel<A><<<blocks_for(std::max(N * G, C)), kBlock, 0, stream>>>(
          psd, psx, splits, N, G, D, double(D * v.HW), m.const_data_ptr<A>(), r.const_data_ptr<A>(),
          ptr_or_null<A>(w), coef.mutable_data_ptr<A>(), grad_weight.mutable_data_ptr<A>(),
          grad_bias.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // No activation: the mask's scale and bias arguments are not read.
      if (output_mask[0])
        channel_grad_input<T>(v, dy, dx, coef[0], coef[1], coef[3], coef[2], coef[0], coef[0],
                              /*per_sample=*/true, 0);
    });
    return {dx, param_grad(v.x, output_mask[1], weight, [&] { return grad_weight; }),
            param_grad(v.x, output_mask[2], weight, [&] { return grad_bias; })};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(normops, CUDA, m) { group_norm::register_kernels<CudaGroupNorm>(m); }

}  // namespace cuda
}  // namespace normops
