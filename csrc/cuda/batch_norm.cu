// Batch norm's CUDA backend: the CUDA channel drivers under the shared op
// logic (csrc/batch_norm_impl.h), with the per-channel constants folded by one
// kernel, and training forward and backward of their own, each a few kernels:
//   forward:  partial moments per (channel, row split) -> merge + constants
//             -> y = act((x - mean) * scale + bias)
//   backward: constants -> partial sums of g and g * (x - mean) -> merge,
//             parameter gradients and dx coefficients -> dx
// so that a step launches a handful of kernels, not a chain of small ATen
// ops on per-channel vectors.
#include <torch/library.h>

#include "../batch_norm_impl.h"
#include "channel_norm.cuh"

namespace normops {
namespace cuda {
namespace {

using batch_norm::Folded;

// Per-(channel, row split) moments of NCHW input: grid (C, splits). Split s
// covers the flat range [s, s + 1) * N*HW / splits of the channel's N planes.
// Writes [splits, C] partials, the layout column_moments_kernel writes.
template <typename T, typename A>
__global__ void plane_split_moments_kernel(const T* __restrict__ x, int64_t N, int64_t C,
                                           int64_t HW, A* __restrict__ pn, A* __restrict__ pmean,
                                           A* __restrict__ pm2) {
  const int64_t c = blockIdx.x, s = blockIdx.y, splits = gridDim.y, total = N * HW;
  const int64_t j0 = total * s / splits, j1 = total * (s + 1) / splits;
  A n = 0, mu = 0, q = 0;
  for (int64_t plane = j0 / HW; plane * HW < j1; ++plane) {
    const int64_t a = max(j0, plane * HW), b = min(j1, (plane + 1) * HW);
    const T* p = x + (plane * C + c) * HW - plane * HW;  // p[j] for flat j of this plane
    for (int64_t j = a + threadIdx.x; j < b; j += blockDim.x) welford_add(n, mu, q, static_cast<A>(p[j]));
  }
  block_merge(n, mu, q);
  if (threadIdx.x == 0) {
    pn[s * C + c] = n;
    pmean[s * C + c] = mu;
    pm2[s * C + c] = q;
  }
}

// Sums of g and g * (x - mean) per (channel, row split) of NCHW input, g the
// gradient through the activation at (x - mean) * scale + bias.
template <Act act, typename T, typename A>
__global__ void plane_split_grad_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                             int64_t N, int64_t C, int64_t HW,
                                             const A* __restrict__ mean, const A* __restrict__ scale,
                                             const A* __restrict__ bias, A* __restrict__ psum_dy,
                                             A* __restrict__ psum_dy_xmu) {
  const int64_t c = blockIdx.x, s = blockIdx.y, splits = gridDim.y, total = N * HW;
  const int64_t j0 = total * s / splits, j1 = total * (s + 1) / splits;
  const A m = mean[c], sc = scale[c], h = bias[c];
  A a = 0, b = 0;
  for (int64_t plane = j0 / HW; plane * HW < j1; ++plane) {
    const int64_t lo = max(j0, plane * HW), hi = min(j1, (plane + 1) * HW);
    const int64_t off = (plane * C + c) * HW - plane * HW;
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
      const A xm = static_cast<A>(x[off + j]) - m;
      const A g = activation_grad<act>(as_stored<T, A>(xm * sc + h), static_cast<A>(dy[off + j]));
      a += g;
      b += g * xm;
    }
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    psum_dy[s * C + c] = a;
    psum_dy_xmu[s * C + c] = b;
  }
}

// The per-channel constants of y = (x - mean) * scale + bias, computed the
// same way wherever they are needed (forward, backward, eval), so that the
// backward's recomputed activation mask is the forward's.
struct ChannelConstants {
  double invstd, weight;
  template <typename W>
  __device__ __forceinline__ ChannelConstants(double var, const W* w, int64_t c, double eps)
      : invstd(1.0 / sqrt(var + eps)), weight(w ? static_cast<double>(w[c]) : 1.0) {}
};

// Chan merge of the [splits, C] partials, then mean and biased var [C] and
// consts = [mean, scale, bias] x C.
template <typename A>
__global__ void forward_finalize_kernel(const A* __restrict__ pn, const A* __restrict__ pmean,
                                        const A* __restrict__ pm2, int64_t splits, int64_t C,
                                        const A* __restrict__ weight, const A* __restrict__ bias,
                                        double eps, A* __restrict__ mean, A* __restrict__ var,
                                        A* __restrict__ consts) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += int64_t(gridDim.x) * blockDim.x) {
    A n = 0, mu = 0, q = 0;
    for (int64_t s = 0; s < splits; ++s) chan_merge(n, mu, q, pn[s * C + c], pmean[s * C + c], pm2[s * C + c]);
    const A v = n > A(0) ? q / n : A(0);
    const ChannelConstants k(static_cast<double>(v), weight, c, eps);
    mean[c] = mu;
    var[c] = v;
    consts[c] = mu;
    consts[C + c] = static_cast<A>(k.invstd * k.weight);
    consts[2 * C + c] = bias ? bias[c] : A(0);
  }
}

// fold(): dbl = [mean, invstd, weight] x C in double, consts = [mean, scale,
// bias] x C in A.
template <typename A, typename S>
__global__ void fold_kernel(const S* __restrict__ mean, const S* __restrict__ var, int64_t C,
                            const A* __restrict__ weight, const A* __restrict__ bias, double eps,
                            double* __restrict__ dbl, A* __restrict__ consts) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += int64_t(gridDim.x) * blockDim.x) {
    const ChannelConstants k(static_cast<double>(var[c]), weight, c, eps);
    dbl[c] = static_cast<double>(mean[c]);
    dbl[C + c] = k.invstd;
    dbl[2 * C + c] = k.weight;
    consts[c] = static_cast<A>(mean[c]);
    consts[C + c] = static_cast<A>(k.invstd * k.weight);
    consts[2 * C + c] = bias ? bias[c] : A(0);
  }
}

// Sums the [splits, C] partials in double; then grad_weight = sum_dy_xmu *
// invstd and grad_bias = sum_dy, and coef = [a, b, c] x C of dx = a * g + b *
// (x - mean) + c.
template <typename A>
__global__ void backward_finalize_kernel(const A* __restrict__ psum_dy,
                                         const A* __restrict__ psum_dy_xmu, int64_t splits,
                                         int64_t C, double count, const A* __restrict__ var,
                                         const A* __restrict__ weight, double eps,
                                         A* __restrict__ grad_weight, A* __restrict__ grad_bias,
                                         A* __restrict__ coef) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += int64_t(gridDim.x) * blockDim.x) {
    double sd = 0, sx = 0;
    for (int64_t s = 0; s < splits; ++s) {
      sd += static_cast<double>(psum_dy[s * C + c]);
      sx += static_cast<double>(psum_dy_xmu[s * C + c]);
    }
    const ChannelConstants k(static_cast<double>(var[c]), weight, c, eps);
    const double a = k.invstd * k.weight;
    grad_weight[c] = static_cast<A>(sx * k.invstd);
    grad_bias[c] = static_cast<A>(sd);
    coef[c] = static_cast<A>(a);
    coef[C + c] = static_cast<A>(centred_coefficient(a, k.invstd, sx / count));
    coef[2 * C + c] = static_cast<A>(-a * sd / count);
  }
}

// running_mean and running_var (either may be null) after a batch with this
// mean and biased var.
template <typename R, typename S>
__global__ void update_running_kernel(R* __restrict__ running_mean, R* __restrict__ running_var,
                                      const S* __restrict__ mean, const S* __restrict__ var,
                                      int64_t C, double momentum, double unbias) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += int64_t(gridDim.x) * blockDim.x) {
    if (running_mean)
      running_mean[c] = static_cast<R>(running_update(static_cast<double>(running_mean[c]),
                                                      static_cast<double>(mean[c]), momentum));
    if (running_var)
      running_var[c] = static_cast<R>(running_update(
          static_cast<double>(running_var[c]), static_cast<double>(var[c]) * unbias, momentum));
  }
}

// Row splits of the per-channel reductions: about 1024 blocks in all.
inline int64_t channel_splits(const ChannelView& v) {
  return v.rows ? row_splits(v.N * v.HW, v.C, 1) : span_splits(v.C, v.N * v.HW);
}

struct CudaBatchNorm : ChannelDrivers {
  static constexpr bool kFused = true;

  static bool use_fused(const ChannelView& v) { return v.N * v.HW > 0 && v.C > 0; }

  static std::tuple<Tensor, Tensor, Tensor> forward_fused(const ChannelView& v,
                                                           const OptTensor& weight,
                                                           const OptTensor& bias, double eps,
                                                           int act) {
    const c10::cuda::CUDAGuard guard(v.x.device());
    const auto acc = acc_dtype(v.x.scalar_type());
    const auto opts = v.x.options().dtype(acc);
    const int64_t C = v.C, splits = channel_splits(v);
    Tensor out = like(v);
    Tensor mean = at::empty({C}, opts), var = at::empty({C}, opts), consts = at::empty({3, C}, opts);
    Tensor partial = at::empty({3, splits, C}, opts);
    Tensor w = acc_param(weight, acc), b = acc_param(bias, acc);
    auto stream = c10::cuda::getCurrentCUDAStream();
    NORMOPS_CUDA_DISPATCH(v.x.scalar_type(), "normops_batch_norm_cuda", [&] {
      using T = scalar_t;
      using A = acc_t<T>;
      const auto p = rows_of<A, 3>(partial);
      A *pn = p[0], *pm = p[1], *pq = p[2];
      if (v.rows) {
        launch_column_moments(v.x.const_data_ptr<T>(), v.N * v.HW, C, splits, 1, pn, pm, pq);
      } else {
        plane_split_moments_kernel<T, A>
            <<<dim3(static_cast<unsigned>(C), static_cast<unsigned>(splits)), kBlock, 0, stream>>>(
                v.x.const_data_ptr<T>(), v.N, C, v.HW, pn, pm, pq);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      forward_finalize_kernel<A><<<blocks_for(C), kBlock, 0, stream>>>(
          pn, pm, pq, splits, C, ptr_or_null<A>(w), ptr_or_null<A>(b), eps,
          mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>(),
          consts.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      channel_affine<T>(v, out, consts[0], consts[1], consts[2], /*per_sample=*/false, act);
    });
    return {out, mean, var};
  }

  static std::tuple<Tensor, Tensor, Tensor> backward_fused(
      const ChannelView& v, const Tensor& dy, const OptTensor& weight, const OptTensor& bias,
      const Tensor& mean, const Tensor& var, double eps, int act, std::array<bool, 3> mask) {
    const c10::cuda::CUDAGuard guard(v.x.device());
    const auto acc = acc_dtype(v.x.scalar_type());
    const auto opts = v.x.options().dtype(acc);
    const int64_t C = v.C, splits = channel_splits(v);
    const Folded f = fold(mean, var, weight, bias, eps, acc);
    Tensor partial = at::empty({2, splits, C}, opts);
    Tensor grad_weight = at::empty({C}, opts), grad_bias = at::empty({C}, opts);
    Tensor coef = at::empty({3, C}, opts);
    Tensor w = acc_param(weight, acc), var_acc = var.to(acc).contiguous();
    Tensor dx = like(v);
    auto stream = c10::cuda::getCurrentCUDAStream();
    NORMOPS_CUDA_DISPATCH(v.x.scalar_type(), "normops_batch_norm_backward_cuda", [&] {
      using T = scalar_t;
      using A = acc_t<T>;
      const auto p = rows_of<A, 2>(partial);
      A *psd = p[0], *psx = p[1];
      dispatch_act(act, [&](auto a) {
        constexpr Act kAct = decltype(a)::value;
        if (v.rows) {
          launch_column_grad_sums<kAct>(
              dy.const_data_ptr<T>(), v.x.const_data_ptr<T>(), v.N * v.HW, C, splits, 1,
              IndexedConstants<A>{f.acc_mean.const_data_ptr<A>(), f.acc_scale.const_data_ptr<A>(),
                                  f.acc_bias.const_data_ptr<A>()},
              psd, psx);
        } else {
          plane_split_grad_sums_kernel<kAct, T, A>
              <<<dim3(static_cast<unsigned>(C), static_cast<unsigned>(splits)), kBlock, 0, stream>>>(
                  dy.const_data_ptr<T>(), v.x.const_data_ptr<T>(), v.N, C, v.HW,
                  f.acc_mean.const_data_ptr<A>(), f.acc_scale.const_data_ptr<A>(),
                  f.acc_bias.const_data_ptr<A>(), psd, psx);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      backward_finalize_kernel<A><<<blocks_for(C), kBlock, 0, stream>>>(
          psd, psx, splits, C, double(v.N * v.HW), var_acc.const_data_ptr<A>(), ptr_or_null<A>(w),
          eps, grad_weight.mutable_data_ptr<A>(), grad_bias.mutable_data_ptr<A>(),
          coef.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      channel_grad_input<T>(v, dy, dx, coef[0], coef[1], f.acc_mean, coef[2], f.acc_scale,
                            f.acc_bias, /*per_sample=*/false, act);
    });
    return {dx, param_grad(v.x, mask[1], weight, [&] { return grad_weight; }),
            param_grad(v.x, mask[2], bias, [&] { return grad_bias; })};
  }

  // One kernel for the constants of mean and var (any floating dtype).
  static Folded fold(const Tensor& mean, const Tensor& var, const OptTensor& weight,
                     const OptTensor& bias, double eps, at::ScalarType acc) {
    const c10::cuda::CUDAGuard guard(mean.device());
    const int64_t C = mean.size(0);
    Tensor dbl = at::empty({3, C}, mean.options().dtype(at::kDouble));
    Tensor consts = at::empty({3, C}, mean.options().dtype(acc));
    Tensor w = acc_param(weight, acc), b = acc_param(bias, acc);
    // Statistics of two dtypes are both read in double (var is not rounded to
    // a half mean's precision).
    const auto stat_dtype =
        var.scalar_type() == mean.scalar_type() ? mean.scalar_type() : at::kDouble;
    Tensor m = mean.to(stat_dtype).contiguous(), q = var.to(stat_dtype).contiguous();
    if (C > 0) {
      auto stream = c10::cuda::getCurrentCUDAStream();
      AT_DISPATCH_FLOATING_TYPES(acc, "normops_fold_cuda", [&] {
        using A = scalar_t;
        NORMOPS_CUDA_DISPATCH(m.scalar_type(), "normops_fold_cuda", [&] {
          fold_kernel<A, scalar_t><<<blocks_for(C), kBlock, 0, stream>>>(
              m.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), C, ptr_or_null<A>(w),
              ptr_or_null<A>(b), eps, dbl.mutable_data_ptr<double>(), consts.mutable_data_ptr<A>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }
    return Folded{dbl[0], dbl[1], dbl[2], consts[0], consts[1], consts[2]};
  }

  static std::tuple<Tensor, Tensor, Tensor> dx_coefficients(const Folded& f,
                                                            const Tensor& mean_dy,
                                                            const Tensor& mean_dy_xmu,
                                                            at::ScalarType acc) {
    return batch_norm::dx_coefficients_aten(f, mean_dy, mean_dy_xmu, acc);
  }

  // One kernel for both buffers when they share a dtype (as a module's do).
  static void update_running(const OptTensor& running_mean, const OptTensor& running_var,
                             const Tensor& mean, const Tensor& var, double momentum,
                             double unbias) {
    const c10::cuda::CUDAGuard guard(mean.device());
    if (present(running_mean) && present(running_var) &&
        running_mean->scalar_type() != running_var->scalar_type()) {
      update_running(running_mean, std::nullopt, mean, var, momentum, unbias);
      update_running(std::nullopt, running_var, mean, var, momentum, unbias);
      return;
    }
    const Tensor& any = present(running_mean) ? *running_mean : *running_var;
    const int64_t C = mean.numel();
    auto stream = c10::cuda::getCurrentCUDAStream();
    NORMOPS_CUDA_DISPATCH(any.scalar_type(), "normops_update_running_stats_cuda", [&] {
      using R = scalar_t;
      R* rm = present(running_mean) ? running_mean->mutable_data_ptr<R>() : nullptr;
      R* rv = present(running_var) ? running_var->mutable_data_ptr<R>() : nullptr;
      NORMOPS_CUDA_DISPATCH(mean.scalar_type(), "normops_update_running_stats_cuda", [&] {
        update_running_kernel<R, scalar_t><<<blocks_for(C), kBlock, 0, stream>>>(
            rm, rv, mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(), C, momentum,
            unbias);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(normops, CUDA, m) { batch_norm::register_kernels<CudaBatchNorm>(m); }

}  // namespace cuda
}  // namespace normops
