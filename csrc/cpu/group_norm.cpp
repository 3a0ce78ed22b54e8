// Group norm's CPU backend: the shared drivers, plus the NCHW path fused
// per (n, group). The op logic is csrc/group_norm_impl.h.
#include <torch/library.h>

#include "../group_norm_impl.h"
#include "channel_norm.h"

namespace normops {
namespace cpu {
namespace {

using group_norm::kOp;

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

// NCHW with enough groups for every thread: each (n, group) is one contiguous
// span of C/G planes, normalised (or differentiated) right after its
// reduction while it is still in cache: one read of x (and dy) from memory.
struct CpuGroupNorm : ChannelDrivers {
  static constexpr bool kFused = true;

  static bool use_fused(const ChannelView& v, int64_t G) {
    return !v.rows && v.N * v.HW > 0 && v.N * G >= at::get_num_threads();
  }
  static std::tuple<Tensor, Tensor, Tensor> forward_fused(const ChannelView& v, int64_t G,
                                                           const OptTensor& weight,
                                                           const OptTensor& bias, double eps) {
    return group_norm::forward_in_double(
        v, G, weight, bias, eps,
        [](const ChannelView& v, int64_t G, const Tensor& out, const Tensor& w, const Tensor& b,
           double eps, const Tensor& mean, const Tensor& rstd) {
          dispatch_floating(v.x.scalar_type(), kOp, [&](auto tag) {
            forward_by_group<typename decltype(tag)::type>(v, G, out, w, b, eps, mean, rstd);
          });
        });
  }
  static std::tuple<Tensor, Tensor, Tensor> backward_fused(const ChannelView& v, int64_t G,
                                                            const Tensor& dy, const Tensor& mean,
                                                            const Tensor& rstd,
                                                            const OptTensor& weight,
                                                            std::array<bool, 3> output_mask) {
    return group_norm::backward_in_double(
        v, G, dy, mean, rstd, weight, output_mask,
        [](const ChannelView& v, int64_t G, const Tensor& dy, const Tensor& dx, const Tensor& mean,
           const Tensor& rstd, const Tensor& w, bool /*need_dx: always*/, const Tensor& sum_dy,
           const Tensor& sum_dy_xmu) {
          dispatch_floating(v.x.scalar_type(), kOp, [&](auto tag) {
            backward_by_group<typename decltype(tag)::type>(v, G, dy, dx, mean, rstd, w, sum_dy,
                                                            sum_dy_xmu);
          });
        });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(normops, CPU, m) { group_norm::register_kernels<CpuGroupNorm>(m); }

}  // namespace cpu
}  // namespace normops
