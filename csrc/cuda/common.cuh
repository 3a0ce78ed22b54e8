// Helpers shared by the CUDA op files: dtype dispatch, launch configuration
// and block-wide reductions of (count, mean, M2) triples and of sums.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "../checks.h"
#include "../moments.h"

namespace normops {
namespace cuda {

constexpr int kWarp = 32;
constexpr int kBlock = 256;  // threads per block of the row and column kernels

// Input types of the CUDA kernels (parameters may be float32 beside half).
#define NORMOPS_CUDA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

template <typename T>
using acc_t = at::acc_type<T, /*is_cuda=*/true>;

// Grid size for `work` independent units, capped to what a grid-stride loop
// needs (the grid's x dimension allows 2^31 - 1 blocks).
inline int64_t grid_for(int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>(work, 65535LL * 32));
}

// A parameter as the kernels read it (the accumulation dtype, usually no
// copy), or an undefined tensor when absent (the kernels take nullptr).
inline Tensor acc_param(const OptTensor& p, at::ScalarType acc) {
  return present(p) ? p->to(acc).contiguous() : Tensor();
}

template <typename A>
const A* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

// VEC consecutive elements, loaded and stored as one aligned access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Elements per 16-byte access.
template <typename T>
constexpr int kVec = 16 / sizeof(T) < 1 ? 1 : 16 / sizeof(T);

inline bool aligned_for(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <typename A>
__device__ __forceinline__ void warp_merge(A& n, A& mean, A& m2) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const A nb = __shfl_xor_sync(0xffffffff, n, offset);
    const A mb = __shfl_xor_sync(0xffffffff, mean, offset);
    const A qb = __shfl_xor_sync(0xffffffff, m2, offset);
    chan_merge(n, mean, m2, nb, mb, qb);
  }
}

// Chan merge of every thread's (n, mean, m2) across the block; every thread
// gets the result. blockDim.x must be a multiple of 32, at most 1024.
template <typename A>
__device__ void block_merge(A& n, A& mean, A& m2) {
  __shared__ A sn[kWarp], sm[kWarp], sq[kWarp];
  warp_merge(n, mean, m2);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  __syncthreads();  // the shared buffers may still be read by a previous call
  if (lane == 0) {
    sn[warp] = n;
    sm[warp] = mean;
    sq[warp] = m2;
  }
  __syncthreads();
  n = lane < warps ? sn[lane] : A(0);
  mean = lane < warps ? sm[lane] : A(0);
  m2 = lane < warps ? sq[lane] : A(0);
  warp_merge(n, mean, m2);
}

// Moments of `len` contiguous values, reduced by the whole block: Welford
// per thread, then Chan merges. Every thread gets (n, mean, m2). With VEC >
// 1, read VEC at a time: len % VEC == 0 and p aligned to VEC elements.
template <int VEC = 1, typename T, typename A>
__device__ void block_span_moments(const T* p, int64_t len, A& n, A& mean, A& m2) {
  n = 0;
  mean = 0;
  m2 = 0;
  for (int64_t i = int64_t(threadIdx.x) * VEC; i < len; i += int64_t(blockDim.x) * VEC) {
    const Pack<T, VEC> v = *reinterpret_cast<const Pack<T, VEC>*>(p + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) welford_add(n, mean, m2, static_cast<A>(v.v[k]));
  }
  block_merge(n, mean, m2);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

// Sum of two values across the block; every thread gets the results.
template <typename A>
__device__ void block_sum2(A& a, A& b) {
  __shared__ A sa[kWarp], sb[kWarp];
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  __syncthreads();
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  a = warp_sum(lane < warps ? sa[lane] : A(0));
  b = warp_sum(lane < warps ? sb[lane] : A(0));
}

template <typename A>
__device__ __forceinline__ A device_rsqrt(A v) {
  return A(1) / sqrt(v);
}

}  // namespace cuda
}  // namespace normops
