// Layer norm on CUDA: one block per row (grid-stride over rows, 64-bit
// indexing); Welford per thread merged across the block with Chan's formula.
// The backward computes dx per row, and dgamma/dbeta as per-block column
// partials reduced afterwards (no atomics).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>
#include <type_traits>

#include "common.cuh"

namespace normops {
namespace cuda {
namespace {

constexpr const char* kOp = "normops.layer_norm";

// gamma and beta may be null (no affine). Rows are read VEC elements at a
// time (D % VEC == 0, rows aligned).
template <int VEC, typename T, typename A>
__global__ void layer_norm_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                                          int64_t rows, int64_t D, const A* __restrict__ gamma,
                                          const A* __restrict__ beta, A eps, A* __restrict__ mean,
                                          A* __restrict__ rstd) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * D;
    A n, mu, m2;
    block_span_moments<VEC>(xr, D, n, mu, m2);
    const A rs = device_rsqrt(m2 / A(D) + eps);
    if (threadIdx.x == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
    T* yr = y + r * D;
    for (int64_t j = int64_t(threadIdx.x) * VEC; j < D; j += int64_t(blockDim.x) * VEC) {
      const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(xr + j);
      Pack<T, VEC> yv;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A g = gamma ? gamma[j + k] : A(1), b = beta ? beta[j + k] : A(0);
        yv.v[k] = static_cast<T>((static_cast<A>(xv.v[k]) - mu) * rs * g + b);
      }
      *reinterpret_cast<Pack<T, VEC>*>(yr + j) = yv;
    }
  }
}

// dx = rstd * (dy*gamma - mean(dy*gamma) - xhat * mean(dy*gamma*xhat)).
template <int VEC, typename T, typename A>
__global__ void layer_norm_grad_input_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                             T* __restrict__ dx, int64_t rows, int64_t D,
                                             const A* __restrict__ mean,
                                             const A* __restrict__ rstd,
                                             const A* __restrict__ gamma) {
  using P = Pack<T, VEC>;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * D;
    const T* gr = dy + r * D;
    const A mu = mean[r], rs = rstd[r];
    A s1 = 0, s2 = 0;
    for (int64_t j = int64_t(threadIdx.x) * VEC; j < D; j += int64_t(blockDim.x) * VEC) {
      const P xv = *reinterpret_cast<const P*>(xr + j), gv = *reinterpret_cast<const P*>(gr + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A g = static_cast<A>(gv.v[k]) * (gamma ? gamma[j + k] : A(1));
        s1 += g;
        s2 += g * (static_cast<A>(xv.v[k]) - mu);
      }
    }
    block_sum2(s1, s2);
    const A k1 = s1 / A(D), k2 = s2 / A(D) * rs * rs;
    T* dr = dx + r * D;
    for (int64_t j = int64_t(threadIdx.x) * VEC; j < D; j += int64_t(blockDim.x) * VEC) {
      const P xv = *reinterpret_cast<const P*>(xr + j), gv = *reinterpret_cast<const P*>(gr + j);
      P out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A g = static_cast<A>(gv.v[k]) * (gamma ? gamma[j + k] : A(1));
        out.v[k] = static_cast<T>(rs * (g - k1 - (static_cast<A>(xv.v[k]) - mu) * k2));
      }
      *reinterpret_cast<P*>(dr + j) = out;
    }
  }
}

// Calls f(std::integral_constant<int, VEC>): 16-byte accesses when every row
// of D elements starts aligned at each of `pointers`, else one element.
template <typename T, class F>
void dispatch_row_vec(int64_t D, std::initializer_list<const void*> pointers, F&& f) {
  constexpr int V = kVec<T>;
  bool vec = D % V == 0;
  for (const void* p : pointers) vec = vec && aligned_for(p, int(sizeof(T)) * V);
  if (vec) return f(std::integral_constant<int, V>{});
  return f(std::integral_constant<int, 1>{});
}

// Column partials of dgamma = sum(dy * xhat) and dbeta = sum(dy): block
// (32, 8) covers 32 columns; blockIdx.y splits the rows. partial: [2, splits, D].
template <typename T, typename A>
__global__ void layer_norm_param_partials_kernel(const T* __restrict__ dy,
                                                 const T* __restrict__ x, int64_t rows,
                                                 int64_t D, const A* __restrict__ mean,
                                                 const A* __restrict__ rstd,
                                                 A* __restrict__ partial) {
  __shared__ A sg[8][kWarp + 1], sb[8][kWarp + 1];
  const int64_t j = int64_t(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t splits = gridDim.y;
  const int64_t r0 = rows * blockIdx.y / splits, r1 = rows * (blockIdx.y + 1) / splits;
  A g = 0, b = 0;
  if (j < D) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      const A d = static_cast<A>(dy[r * D + j]);
      g += d * (static_cast<A>(x[r * D + j]) - mean[r]) * rstd[r];
      b += d;
    }
  }
  sg[threadIdx.y][threadIdx.x] = g;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && j < D) {
    for (int k = 1; k < blockDim.y; ++k) {
      g += sg[k][threadIdx.x];
      b += sb[k][threadIdx.x];
    }
    partial[blockIdx.y * D + j] = g;
    partial[(splits + blockIdx.y) * D + j] = b;
  }
}

std::tuple<Tensor, Tensor, Tensor> layer_norm(const Tensor& input, c10::SymIntArrayRef shape_sym,
                                              const OptTensor& weight, const OptTensor& bias,
                                              double eps) {
  const auto shape = C10_AS_INTARRAYREF_SLOW(shape_sym);
  auto [rows, D] = check_layer_norm(input, shape, weight, bias, kOp);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto acc = acc_dtype(input.scalar_type());
  Tensor x = input.contiguous();
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const auto st = layer_norm_stat_shape(input, shape.size());
  Tensor mean = at::empty(st, x.options().dtype(acc)), rstd = at::empty(st, x.options().dtype(acc));
  if (rows == 0 || D == 0) return {out, mean, rstd};
  Tensor w = acc_param(weight, acc), b = acc_param(bias, acc);
  auto stream = c10::cuda::getCurrentCUDAStream();
  NORMOPS_CUDA_DISPATCH(x.scalar_type(), "normops_layer_norm_cuda", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    dispatch_row_vec<T>(D, {x.const_data_ptr(), out.const_data_ptr()}, [&](auto vec) {
      layer_norm_forward_kernel<decltype(vec)::value, T, A>
          <<<static_cast<unsigned>(grid_for(rows)), kBlock, 0, stream>>>(
              x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), rows, D, ptr_or_null<A>(w),
              ptr_or_null<A>(b), A(eps), mean.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(
    const Tensor& grad_out, const Tensor& input, c10::SymIntArrayRef shape_sym, const Tensor& mean,
    const Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
    std::array<bool, 3> output_mask) {
  const auto shape = C10_AS_INTARRAYREF_SLOW(shape_sym);
  auto [rows, D] = check_layer_norm(input, shape, weight, bias, kOp);
  check_layer_norm_backward(grad_out, input, mean, rstd, rows, kOp);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto acc = acc_dtype(input.scalar_type());
  Tensor x = input.contiguous(), dy = grad_out.contiguous();
  Tensor m = mean.to(acc).contiguous(), r = rstd.to(acc).contiguous();
  Tensor grad_input = output_mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous)
                                     : at::empty({0}, input.options());
  const bool need_params = output_mask[1] || output_mask[2];
  const int64_t splits = need_params ? std::max<int64_t>(1, std::min<int64_t>(rows / 64, 512)) : 0;
  Tensor partial = at::zeros({2, splits, need_params ? D : 0}, x.options().dtype(acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (rows > 0 && D > 0) {
    Tensor w = acc_param(weight, acc);
    NORMOPS_CUDA_DISPATCH(x.scalar_type(), "normops_layer_norm_backward_cuda", [&] {
      using A = acc_t<scalar_t>;
      if (output_mask[0]) {
        dispatch_row_vec<scalar_t>(
            D, {dy.const_data_ptr(), x.const_data_ptr(), grad_input.const_data_ptr()}, [&](auto vec) {
              layer_norm_grad_input_kernel<decltype(vec)::value, scalar_t, A>
                  <<<static_cast<unsigned>(grid_for(rows)), kBlock, 0, stream>>>(
                      dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                      grad_input.mutable_data_ptr<scalar_t>(), rows, D, m.const_data_ptr<A>(),
                      r.const_data_ptr<A>(), ptr_or_null<A>(w));
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
      }
      if (need_params) {
        const dim3 grid(static_cast<unsigned>((D + kWarp - 1) / kWarp), static_cast<unsigned>(splits));
        layer_norm_param_partials_kernel<scalar_t, A><<<grid, dim3(kWarp, 8), 0, stream>>>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), rows, D,
            m.const_data_ptr<A>(), r.const_data_ptr<A>(), partial.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  return {grad_input,
          layer_norm_param_grad(input, partial, 0, output_mask[1], weight, shape),
          layer_norm_param_grad(input, partial, 1, output_mask[2], bias, shape)};
}

}  // namespace

TORCH_LIBRARY_IMPL(normops, CUDA, m) {
  m.impl("layer_norm", &layer_norm);
  m.impl("layer_norm_backward", &layer_norm_backward);
}

}  // namespace cuda
}  // namespace normops
