// Layer norm on the CPU: rows of the trailing normalized_shape, each reduced
// with a two-pass while in L1 and normalised in the same visit. The backward
// computes dx from the same cache-resident row that feeds per-chunk dgamma and
// dbeta partials, reduced afterwards (no atomics).
#include <torch/library.h>

#include <tuple>

#include "common.h"

namespace normops {
namespace cpu {
namespace {

constexpr const char* kOp = "normops.layer_norm";

std::pair<int64_t, int64_t> check_ln(const Tensor& input, c10::SymIntArrayRef shape,
                                     const OptTensor& weight, const OptTensor& bias) {
  return check_layer_norm(input, C10_AS_INTARRAYREF_SLOW(shape), weight, bias, kOp);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm(const Tensor& input, c10::SymIntArrayRef shape,
                                              const OptTensor& weight, const OptTensor& bias,
                                              double eps) {
  auto [rows, D] = check_ln(input, shape, weight, bias);
  const auto acc = acc_dtype(input.scalar_type());
  Tensor x = input.contiguous();
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const auto st = layer_norm_stat_shape(input, shape.size());
  Tensor mean = at::empty(st, x.options().dtype(acc));
  Tensor rstd = at::empty(st, x.options().dtype(acc));
  if (rows == 0 || D == 0) return {out, mean, rstd};
  Tensor w = acc_vector(weight, D, acc, 1.0), b = acc_vector(bias, D, acc, 0.0);
  dispatch_floating(input.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const auto& k = kernels<T>();
    const T* px = ptr<const T>(x);
    T* py = ptr<T>(out);
    const int64_t grain = std::max<int64_t>(1, 16384 / D);
    const bool stream = stream_output(out);
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      const StreamFence fence{stream};
      write_output(k, stream, py + r0 * D, (r1 - r0) * D, 0, 1, D, [&](T* dst, int64_t o, int64_t n) {
        const int64_t first = r0 + o / D;
        k.layer_norm_rows(px + first * D, dst, n / D, D, ptr<const A>(w), ptr<const A>(b), A(eps),
                          ptr<A>(mean) + first, ptr<A>(rstd) + first);
      });
    });
  });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(
    const Tensor& grad_out, const Tensor& input, c10::SymIntArrayRef shape, const Tensor& mean,
    const Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
    std::array<bool, 3> output_mask) {
  auto [rows, D] = check_ln(input, shape, weight, bias);
  check_layer_norm_backward(grad_out, input, mean, rstd, rows, kOp);
  const auto acc = acc_dtype(input.scalar_type());
  Tensor x = input.contiguous(), dy = grad_out.contiguous();
  Tensor m = mean.to(acc).contiguous(), r = rstd.to(acc).contiguous();
  const bool need_dx = output_mask[0];
  const bool need_params = output_mask[1] || output_mask[2];
  Tensor grad_input = need_dx ? at::empty_like(x, at::MemoryFormat::Contiguous)
                              : at::empty({0}, input.options());
  const int64_t chunks = need_params ? num_chunks(rows, 16) : 1;
  Tensor partial = at::zeros({2, chunks, need_params ? D : 0}, x.options().dtype(acc));
  if (rows > 0 && D > 0 && (need_dx || need_params)) {
    Tensor w = acc_vector(weight, D, acc, 1.0);
    dispatch_floating(input.scalar_type(), kOp, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      const auto& k = kernels<T>();
      const T* px = ptr<const T>(x);
      const T* pg = ptr<const T>(dy);
      T* pd = need_dx ? ptr<T>(grad_input) : nullptr;
      A* pp = ptr<A>(partial);
      const int64_t grain = std::max<int64_t>(1, 16384 / D);
      // Rows under 8 KB keep plain stores: streamed, dx was slower, most of
      // all beside the parameter gradients, whose partial sums the same loop
      // updates in L1. Op level, 2 threads, with them, plain vs streamed in
      // one process: 8192x768 2.32 vs 3.21 ms, 8192x1024 3.41 vs 4.46,
      // 16384x1024 6.87 vs 8.80, 8192x1280 5.93 vs 6.43, 16384x256 1.44 vs
      // 1.45; longer rows 4096x2048 4.61 vs 4.18, 2048x4096 4.61 vs 4.59,
      // 8192x4096 18.9 vs 17.5. (NORMOPS_STREAMING_STORES=1 streams them
      // all, for the tests.)
      const bool long_rows = D * int64_t(sizeof(T)) >= 8192;
      const bool stream = need_dx && (long_rows || streaming_mode() == Streaming::Always) &&
                          stream_output(grad_input);
      const auto rows_to = [&](T* dst, int64_t first, int64_t count, A* dg, A* db) {
        k.layer_norm_backward_rows(pg + first * D, px + first * D, dst, count, D,
                                   ptr<const A>(m) + first, ptr<const A>(r) + first,
                                   ptr<const A>(w), dg, db);
      };
      const auto run = [&](int64_t r0, int64_t r1, A* dg, A* db) {
        if (pd == nullptr) return rows_to(nullptr, r0, r1 - r0, dg, db);
        const StreamFence fence{stream};
        write_output(k, stream, pd + r0 * D, (r1 - r0) * D, 0, 1, D,
                     [&](T* dst, int64_t o, int64_t n) { rows_to(dst, r0 + o / D, n / D, dg, db); });
      };
      if (need_params) {
        for_each_chunk(rows, chunks, [&](int64_t c, int64_t r0, int64_t r1) {
          run(r0, r1, pp + c * D, pp + (chunks + c) * D);
        });
      } else {
        at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { run(r0, r1, nullptr, nullptr); });
      }
    });
  }
  return {grad_input,
          layer_norm_param_grad(input, partial, 0, output_mask[1], weight, C10_AS_INTARRAYREF_SLOW(shape)),
          layer_norm_param_grad(input, partial, 1, output_mask[2], bias, C10_AS_INTARRAYREF_SLOW(shape))};
}

}  // namespace

TORCH_LIBRARY_IMPL(normops, CPU, m) {
  m.impl("layer_norm", &layer_norm);
  m.impl("layer_norm_backward", &layer_norm_backward);
}

}  // namespace cpu
}  // namespace normops
