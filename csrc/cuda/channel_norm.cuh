// CUDA drivers shared by the per-channel norms (batch norm) and the
// per-sample ones (group and instance norm), with the semantics of the CPU
// drivers (csrc/cpu/channel_norm.h): statistics, the affine step and the two
// backward passes over a ChannelView, in either layout. Constants are
// indexed per channel ([C], per_sample = false) or per (n, c) ([N*C]).
//
// Reductions: per-thread Welford (or sums), merged across the block with
// Chan's formula, written as per-block partials and merged by a second
// kernel: no float atomics. Indexing is 64-bit throughout.
#pragma once

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "../channel_view.h"
#include "common.cuh"

namespace normops {
namespace cuda {

constexpr int kRowsPerBlock = 8;  // threadIdx.y extent of the column kernels

inline unsigned blocks_for(int64_t n, int threads = kBlock) {
  return static_cast<unsigned>(grid_for((n + threads - 1) / threads));
}

// The pre-activation as the forward stored it (rounded to T), so that the
// backward's activation mask matches the unfused BatchNorm -> ReLU6.
template <typename T, typename A>
__device__ __forceinline__ A as_stored(A z) {
  return static_cast<A>(static_cast<T>(z));
}

// Where the constants of element i are: channel c, or (n, c) when per
// sample; integer divisions by fast multiply-shift dividers (32-bit when the
// tensor allows it, else plain 64-bit ones).
template <typename I>
struct ChannelIndex {
  at::cuda::detail::IntDivider<I> hw, c, chw;
  bool rows, per_sample;
  I C;
  __device__ __forceinline__ I operator()(I i) const {
    if (rows) {
      const I ch = c.divmod(i).mod;
      return per_sample ? chw.div(i) * C + ch : ch;
    }
    const I plane = hw.div(i);  // n * C + c
    return per_sample ? plane : c.divmod(plane).mod;
  }
};

template <typename I>
ChannelIndex<I> channel_index(const ChannelView& v, bool per_sample) {
  const auto d = [](int64_t n) { return at::cuda::detail::IntDivider<I>(static_cast<I>(n)); };
  return ChannelIndex<I>{d(v.HW), d(v.C), d(v.C * v.HW), v.rows, per_sample, static_cast<I>(v.C)};
}

// The elementwise kernels visit VEC elements at a time: 16 bytes when the
// pointers are aligned and VEC consecutive elements share a plane (NCHW) or
// a row (channels_last), so that their constants are one (NCHW) or VEC
// consecutive (channels_last) entries; f(i, k, step) does elements i.. with
// constants k, k + step, ...
template <int VEC, typename I, class F>
__global__ void channel_map_kernel(I units, ChannelIndex<I> index, F f) {
  const I step = index.rows ? 1 : 0;
  for (I u = I(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += I(gridDim.x) * blockDim.x) {
    const I i = u * VEC;
    f(i, index(i), step);
  }
}

// Runs channel_map_kernel over every element of `v` with the functor that
// make(std::integral_constant<int, VEC>) returns; `pointers` are the tensors
// the functor reads and writes, which must be aligned for the vector path.
template <typename T, class Make>
void channel_map(const ChannelView& v, bool per_sample, std::initializer_list<const void*> pointers,
                 Make make) {
  constexpr int V = kVec<T>;
  const int64_t numel = v.x.numel();
  if (numel == 0) return;
  bool vec = (v.rows ? v.C : v.HW) % V == 0;
  for (const void* p : pointers) vec = vec && aligned_for(p, int(sizeof(T)) * V);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto tag, auto index_tag) {
    constexpr int VEC = decltype(tag)::value;
    using I = decltype(index_tag);
    const int64_t units = numel / VEC;
    channel_map_kernel<VEC, I><<<blocks_for(units), kBlock, 0, stream>>>(
        static_cast<I>(units), channel_index<I>(v, per_sample), make(tag));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const bool small = numel < (int64_t(1) << 31);
  if (vec) {
    small ? launch(std::integral_constant<int, V>{}, uint32_t{})
          : launch(std::integral_constant<int, V>{}, uint64_t{});
  } else {
    small ? launch(std::integral_constant<int, 1>{}, uint32_t{})
          : launch(std::integral_constant<int, 1>{}, uint64_t{});
  }
}

// Moments of each plane of HW elements: one block per plane.
template <typename T, typename A>
__global__ void plane_moments_kernel(const T* __restrict__ x, int64_t planes, int64_t HW,
                                     A* __restrict__ mean, A* __restrict__ m2) {
  for (int64_t p = blockIdx.x; p < planes; p += gridDim.x) {
    A n, mu, q;
    block_span_moments(x + p * HW, HW, n, mu, q);
    if (threadIdx.x == 0) {
      mean[p] = mu;
      m2[p] = q;
    }
  }
}

// Column moments of `samples` blocks of rows x C (rows_per_sample rows each):
// grid (C / 32, splits, up to 65535 sample slots), block (32,
// kRowsPerBlock). Writes partials [samples, splits, C].
template <typename T, typename A>
__global__ void column_moments_kernel(const T* __restrict__ x, int64_t rows_per_sample, int64_t C,
                                      int64_t samples, A* __restrict__ pn, A* __restrict__ pmean,
                                      A* __restrict__ pm2) {
  __shared__ A sn[kRowsPerBlock][kWarp], sm[kRowsPerBlock][kWarp], sq[kRowsPerBlock][kWarp];
  const int64_t c = int64_t(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t splits = gridDim.y;
  const int64_t r0 = rows_per_sample * blockIdx.y / splits;
  const int64_t r1 = rows_per_sample * (blockIdx.y + 1) / splits;
  for (int64_t s = blockIdx.z; s < samples; s += gridDim.z) {
    const T* xs = x + s * rows_per_sample * C;
    A n = 0, mu = 0, q = 0;
    if (c < C) {
      for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowsPerBlock)
        welford_add(n, mu, q, static_cast<A>(xs[r * C + c]));
    }
    sn[threadIdx.y][threadIdx.x] = n;
    sm[threadIdx.y][threadIdx.x] = mu;
    sq[threadIdx.y][threadIdx.x] = q;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      for (int k = 1; k < kRowsPerBlock; ++k)
        chan_merge(n, mu, q, sn[k][threadIdx.x], sm[k][threadIdx.x], sq[k][threadIdx.x]);
      const int64_t o = (s * splits + blockIdx.y) * C + c;
      pn[o] = n;
      pmean[o] = mu;
      pm2[o] = q;
    }
    __syncthreads();  // the shared partials are rewritten for the next sample
  }
}

// Chan merge over the middle axis of [S, K, C] triples into [S, C].
template <typename A>
__global__ void merge_moments_kernel(const A* __restrict__ pn, const A* __restrict__ pmean,
                                     const A* __restrict__ pm2, int64_t S, int64_t K, int64_t C,
                                     A* __restrict__ mean, A* __restrict__ m2) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < S * C;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = i / C, c = i % C;
    A n = 0, mu = 0, q = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t o = (s * K + k) * C + c;
      chan_merge(n, mu, q, pn[o], pmean[o], pm2[o]);
    }
    mean[i] = mu;
    m2[i] = q;
  }
}

// Row splits so that the column kernels over C channels x `samples` fill the
// GPU (about 1024 blocks), each split at least 32 rows.
inline int64_t row_splits(int64_t rows, int64_t C, int64_t samples) {
  const int64_t column_blocks = (C + kWarp - 1) / kWarp;
  const int64_t want = std::max<int64_t>(1, 1024 / std::max<int64_t>(1, column_blocks * samples));
  return std::max<int64_t>(1, std::min<int64_t>({want, rows / 32, 65535}));
}

// The column kernels over `samples` blocks of rows_per_sample rows x C:
// partials [samples, splits, C]. Samples past the grid's z limit (65535)
// are looped over.
inline dim3 column_grid(int64_t C, int64_t splits, int64_t samples) {
  return dim3(static_cast<unsigned>((C + kWarp - 1) / kWarp), static_cast<unsigned>(splits),
              static_cast<unsigned>(std::min<int64_t>(samples, 65535)));
}

// Pointers to the K rows of a [K, n] tensor of per-block partials.
template <typename A, size_t K>
std::array<A*, K> rows_of(const Tensor& t) {
  std::array<A*, K> r;
  for (size_t i = 0; i < K; ++i) r[i] = t[i].mutable_data_ptr<A>();
  return r;
}

// Splits of `spans` reductions of `len` values each, for about 1024 blocks
// in all, each split at least 4 * kBlock values.
inline int64_t span_splits(int64_t spans, int64_t len) {
  return std::max<int64_t>(
      1, std::min<int64_t>({(1024 + spans - 1) / spans, len / (4 * kBlock), 65535}));
}

template <typename T, typename A>
void launch_column_moments(const T* x, int64_t rows_per_sample, int64_t C, int64_t splits,
                           int64_t samples, A* pn, A* pmean, A* pm2) {
  column_moments_kernel<T, A>
      <<<column_grid(C, splits, samples), dim3(kWarp, kRowsPerBlock), 0,
         c10::cuda::getCurrentCUDAStream()>>>(x, rows_per_sample, C, samples, pn, pmean, pm2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
std::pair<Tensor, Tensor> channel_moments(const ChannelView& v, bool per_sample) {
  using A = acc_t<T>;
  const auto opts = v.x.options().dtype(acc_dtype(v.x.scalar_type()));
  const int64_t out_len = per_sample ? v.N * v.C : v.C;
  Tensor mean = at::zeros({out_len}, opts), m2 = at::zeros({out_len}, opts);
  if (v.N * v.HW == 0 || v.C == 0) return {mean, m2};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const T* x = v.x.const_data_ptr<T>();
  if (!v.rows) {
    Tensor pm = at::empty({v.N * v.C}, opts), pq = at::empty({v.N * v.C}, opts);
    plane_moments_kernel<T, A><<<static_cast<unsigned>(grid_for(v.N * v.C)), kBlock, 0, stream>>>(
        x, v.N * v.C, v.HW, pm.mutable_data_ptr<A>(), pq.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (per_sample) return {pm, pq};
    // Merge the N planes of each channel: [1, N, C] -> [C].
    Tensor counts = at::full({v.N * v.C}, double(v.HW), opts);
    merge_moments_kernel<A><<<blocks_for(v.C), kBlock, 0, stream>>>(
        counts.const_data_ptr<A>(), pm.const_data_ptr<A>(), pq.const_data_ptr<A>(), 1, v.N, v.C,
        mean.mutable_data_ptr<A>(), m2.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {mean, m2};
  }
  const int64_t samples = per_sample ? v.N : 1;
  const int64_t rows = per_sample ? v.HW : v.N * v.HW;
  const int64_t splits = row_splits(rows, v.C, samples);
  Tensor pn = at::empty({samples * splits * v.C}, opts), pm = at::empty_like(pn),
         pq = at::empty_like(pn);
  launch_column_moments(x, rows, v.C, splits, samples, pn.mutable_data_ptr<A>(),
                        pm.mutable_data_ptr<A>(), pq.mutable_data_ptr<A>());
  merge_moments_kernel<A><<<blocks_for(samples * v.C), kBlock, 0, stream>>>(
      pn.const_data_ptr<A>(), pm.const_data_ptr<A>(), pq.const_data_ptr<A>(), samples, splits, v.C,
      mean.mutable_data_ptr<A>(), m2.mutable_data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, m2};
}

// Calls f(std::integral_constant<Act, act>) for the runtime activation code.
template <typename F>
void dispatch_act(int act, F&& f) {
  switch (act) {
    case 1: return f(std::integral_constant<Act, Act::ReLU>{});
    case 2: return f(std::integral_constant<Act, Act::ReLU6>{});
    default: return f(std::integral_constant<Act, Act::None>{});
  }
}

// y = act((x - mean) * scale + bias), constants per channel or per (n, c).
template <Act act, typename T, typename A, int VEC>
struct AffineFn {
  const T* x;
  T* y;
  const A *mean, *scale, *bias;
  template <typename I>
  __device__ __forceinline__ void operator()(I i, I k, I step) const {
    const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
    Pack<T, VEC> yv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const I kj = k + step * j;
      yv.v[j] = static_cast<T>(activate<act>((static_cast<A>(xv.v[j]) - mean[kj]) * scale[kj] + bias[kj]));
    }
    *reinterpret_cast<Pack<T, VEC>*>(y + i) = yv;
  }
};

template <typename T>
void channel_affine(const ChannelView& v, const Tensor& out, const Tensor& mean,
                    const Tensor& scale, const Tensor& bias, bool per_sample, int act) {
  using A = acc_t<T>;
  const T* x = v.x.const_data_ptr<T>();
  T* y = out.mutable_data_ptr<T>();
  dispatch_act(act, [&](auto a) {
    channel_map<T>(v, per_sample, {x, y}, [&](auto vec) {
      return AffineFn<decltype(a)::value, T, A, decltype(vec)::value>{
          x, y, mean.const_data_ptr<A>(), scale.const_data_ptr<A>(), bias.const_data_ptr<A>()};
    });
  });
}

// The constants (mean, scale, bias) of constant index k, from three arrays.
template <typename A>
struct IndexedConstants {
  const A *mean, *scale, *bias;
  __device__ __forceinline__ void operator()(int64_t k, A& m, A& s, A& h) const {
    m = mean[k];
    s = scale[k];
    h = bias[k];
  }
};

// Group norm's: index k = n * C + c has its (n, group) mean at k / D (C = G *
// D); there is no activation, so scale and bias do not matter.
template <typename A>
struct GroupMean {
  const A* mean;
  int64_t D;
  __device__ __forceinline__ void operator()(int64_t k, A& m, A& s, A& h) const {
    m = mean[k / D];
    s = A(1);
    h = A(0);
  }
};

// Sums of g and g * (x - mean) per plane (one block per plane), or per
// column block partial ([samples, splits, C]); g is dy through the
// activation at (x - mean) * scale + bias, constants from consts(k).
template <Act act, typename T, typename A, class K>
__global__ void plane_grad_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                       int64_t planes, int64_t HW, int64_t period, K consts,
                                       A* __restrict__ sum_dy, A* __restrict__ sum_dy_xmu) {
  for (int64_t p = blockIdx.x; p < planes; p += gridDim.x) {
    A m, s, h;
    consts(p % period, m, s, h);
    A a = 0, b = 0;
    for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) {
      const A xv = static_cast<A>(x[p * HW + i]);
      const A g = activation_grad<act>(as_stored<T, A>((xv - m) * s + h), static_cast<A>(dy[p * HW + i]));
      a += g;
      b += g * (xv - m);
    }
    block_sum2(a, b);
    if (threadIdx.x == 0) {
      sum_dy[p] = a;
      sum_dy_xmu[p] = b;
    }
  }
}

template <Act act, typename T, typename A, class K>
__global__ void column_grad_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                        int64_t rows_per_sample, int64_t C, int64_t samples,
                                        K consts, A* __restrict__ psum_dy,
                                        A* __restrict__ psum_dy_xmu) {
  __shared__ A sa[kRowsPerBlock][kWarp], sb[kRowsPerBlock][kWarp];
  const int64_t c = int64_t(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t splits = gridDim.y;
  const int64_t r0 = rows_per_sample * blockIdx.y / splits;
  const int64_t r1 = rows_per_sample * (blockIdx.y + 1) / splits;
  for (int64_t s = blockIdx.z; s < samples; s += gridDim.z) {
    const int64_t base = s * rows_per_sample * C;
    A a = 0, b = 0;
    if (c < C) {
      A m, sc, h;
      consts(s * C + c, m, sc, h);  // per (sample, channel); one sample: per channel
      for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowsPerBlock) {
        const A xv = static_cast<A>(x[base + r * C + c]);
        const A g = activation_grad<act>(as_stored<T, A>((xv - m) * sc + h),
                                         static_cast<A>(dy[base + r * C + c]));
        a += g;
        b += g * (xv - m);
      }
    }
    sa[threadIdx.y][threadIdx.x] = a;
    sb[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      for (int k = 1; k < kRowsPerBlock; ++k) {
        a += sa[k][threadIdx.x];
        b += sb[k][threadIdx.x];
      }
      const int64_t o = (s * splits + blockIdx.y) * C + c;
      psum_dy[o] = a;
      psum_dy_xmu[o] = b;
    }
    __syncthreads();  // the shared partials are rewritten for the next sample
  }
}

template <Act act, typename T, typename A, class K>
void launch_column_grad_sums(const T* dy, const T* x, int64_t rows_per_sample, int64_t C,
                             int64_t splits, int64_t samples, K consts, A* psum_dy,
                             A* psum_dy_xmu) {
  column_grad_sums_kernel<act, T, A>
      <<<column_grid(C, splits, samples), dim3(kWarp, kRowsPerBlock), 0,
         c10::cuda::getCurrentCUDAStream()>>>(dy, x, rows_per_sample, C, samples, consts,
                                              psum_dy, psum_dy_xmu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Per channel or per (n, c): sum of g and of g * (x - mean). Double tensors.
template <typename T>
std::pair<Tensor, Tensor> channel_grad_sums(const ChannelView& v, const Tensor& dy,
                                            const Tensor& mean, const Tensor& scale,
                                            const Tensor& bias, bool per_sample, int act) {
  using A = acc_t<T>;
  const auto opts = v.x.options().dtype(acc_dtype(v.x.scalar_type()));
  const int64_t out_len = per_sample ? v.N * v.C : v.C;
  if (v.N * v.HW == 0 || v.C == 0) {
    const auto dopts = v.x.options().dtype(at::kDouble);
    return {at::zeros({out_len}, dopts), at::zeros({out_len}, dopts)};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  const IndexedConstants<A> consts{mean.const_data_ptr<A>(), scale.const_data_ptr<A>(),
                                   bias.const_data_ptr<A>()};
  Tensor pd, px;
  dispatch_act(act, [&](auto a) {
    constexpr Act kAct = decltype(a)::value;
    if (!v.rows) {
      pd = at::empty({v.N, v.C}, opts);
      px = at::empty({v.N, v.C}, opts);
      plane_grad_sums_kernel<kAct, T, A>
          <<<static_cast<unsigned>(grid_for(v.N * v.C)), kBlock, 0, stream>>>(
              dy.const_data_ptr<T>(), v.x.const_data_ptr<T>(), v.N * v.C, v.HW,
              per_sample ? v.N * v.C : v.C, consts, pd.mutable_data_ptr<A>(),
              px.mutable_data_ptr<A>());
    } else {
      const int64_t samples = per_sample ? v.N : 1;
      const int64_t rows = per_sample ? v.HW : v.N * v.HW;
      const int64_t splits = row_splits(rows, v.C, samples);
      pd = at::empty({samples, splits, v.C}, opts);
      px = at::empty({samples, splits, v.C}, opts);
      launch_column_grad_sums<kAct>(dy.const_data_ptr<T>(), v.x.const_data_ptr<T>(), rows, v.C,
                                    splits, samples, consts, pd.mutable_data_ptr<A>(),
                                    px.mutable_data_ptr<A>());
      return;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Partials added up in double: planes over n (per channel), row splits.
  if (!v.rows) {
    pd = pd.to(at::kDouble);
    px = px.to(at::kDouble);
    return per_sample ? std::make_pair(pd.reshape({out_len}), px.reshape({out_len}))
                      : std::make_pair(pd.sum(0), px.sum(0));
  }
  return {pd.to(at::kDouble).sum(1).reshape({out_len}), px.to(at::kDouble).sum(1).reshape({out_len})};
}

// dx = a * g + b * (x - m) + c, g = dy masked at (x - m) * scale + bias.
template <Act act, typename T, typename A, int VEC>
struct GradInputFn {
  const T *dy, *x;
  T* dx;
  const A *a, *b, *m, *c, *scale, *bias;
  template <typename I>
  __device__ __forceinline__ void operator()(I i, I k, I step) const {
    const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
    const Pack<T, VEC> gv = *reinterpret_cast<const Pack<T, VEC>*>(dy + i);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const I kj = k + step * j;
      const A xm = static_cast<A>(xv.v[j]) - m[kj];
      const A g = activation_grad<act>(as_stored<T, A>(xm * scale[kj] + bias[kj]),
                                       static_cast<A>(gv.v[j]));
      out.v[j] = static_cast<T>(a[kj] * g + centred_term(b[kj], xm) + c[kj]);
    }
    *reinterpret_cast<Pack<T, VEC>*>(dx + i) = out;
  }
};

template <typename T>
void channel_grad_input(const ChannelView& v, const Tensor& dy, const Tensor& dx,
                        const Tensor& a, const Tensor& b, const Tensor& m, const Tensor& c,
                        const Tensor& scale, const Tensor& bias, bool per_sample, int act) {
  using A = acc_t<T>;
  const T* x = v.x.const_data_ptr<T>();
  const T* g = dy.const_data_ptr<T>();
  T* d = dx.mutable_data_ptr<T>();
  dispatch_act(act, [&](auto tag) {
    channel_map<T>(v, per_sample, {x, g, d}, [&](auto vec) {
      return GradInputFn<decltype(tag)::value, T, A, decltype(vec)::value>{
          g, x, d, a.const_data_ptr<A>(), b.const_data_ptr<A>(), m.const_data_ptr<A>(),
          c.const_data_ptr<A>(), scale.const_data_ptr<A>(), bias.const_data_ptr<A>()};
    });
  });
}

// The drivers above for any input dtype: what the shared op logic
// (csrc/batch_norm_impl.h, csrc/group_norm_impl.h) calls, on the input's
// device and current stream.
struct ChannelDrivers {
  static std::pair<Tensor, Tensor> moments(const ChannelView& v, bool per_sample) {
    const c10::cuda::CUDAGuard guard(v.x.device());
    std::pair<Tensor, Tensor> r;
    NORMOPS_CUDA_DISPATCH(v.x.scalar_type(), "normops_moments_cuda",
                          [&] { r = channel_moments<scalar_t>(v, per_sample); });
    return r;
  }
  static void affine(const ChannelView& v, const Tensor& out, const Tensor& mean,
                     const Tensor& scale, const Tensor& bias, bool per_sample, int act) {
    const c10::cuda::CUDAGuard guard(v.x.device());
    NORMOPS_CUDA_DISPATCH(v.x.scalar_type(), "normops_affine_cuda", [&] {
      channel_affine<scalar_t>(v, out, mean, scale, bias, per_sample, act);
    });
  }
  static std::pair<Tensor, Tensor> grad_sums(const ChannelView& v, const Tensor& dy,
                                             const Tensor& mean, const Tensor& scale,
                                             const Tensor& bias, bool per_sample, int act) {
    const c10::cuda::CUDAGuard guard(v.x.device());
    std::pair<Tensor, Tensor> r;
    NORMOPS_CUDA_DISPATCH(v.x.scalar_type(), "normops_grad_sums_cuda", [&] {
      r = channel_grad_sums<scalar_t>(v, dy, mean, scale, bias, per_sample, act);
    });
    return r;
  }
  static void grad_input(const ChannelView& v, const Tensor& dy, const Tensor& dx,
                         const Tensor& a, const Tensor& b, const Tensor& m, const Tensor& c,
                         const Tensor& scale, const Tensor& bias, bool per_sample, int act) {
    const c10::cuda::CUDAGuard guard(v.x.device());
    NORMOPS_CUDA_DISPATCH(v.x.scalar_type(), "normops_grad_input_cuda", [&] {
      channel_grad_input<scalar_t>(v, dy, dx, a, b, m, c, scale, bias, per_sample, act);
    });
  }
};

}  // namespace cuda
}  // namespace normops
