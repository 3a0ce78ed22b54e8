// The fused inference inverted residual on the CPU. Work is split over
// (image, band of output rows); each task walks its band a few output rows
// at a time, keeping the expanded rows it needs (plus the halo) in a per-task
// buffer: expand (GEMM + ReLU6) only the rows not kept from the previous
// step, depthwise + ReLU6 into a second buffer, project (GEMM) and write the
// output with the residual. The expanded tensor never exists in full: the
// buffers hold a few rows, in L2. Computed in channels_last, in float
// (float64 for float64 input).
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../inverted_residual.h"
#include "common.h"

namespace normops {
namespace cpu {
namespace {

using namespace inverted_residual;

constexpr int64_t kPixelsPerStep = 192;  // output pixels per project GEMM

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Weights laid out for the kernels: transposed, channels padded with zeros.
struct Packed {
  Tensor expand_w, expand_b, dw_w, dw_b, project_w, project_b;
  int64_t hidden_pad, out_pad;
};

Packed pack(const Dims& d, const OptTensor& ew, const OptTensor& eb, const Tensor& dw,
            const Tensor& db, const Tensor& pw, const Tensor& pb, at::ScalarType acc,
            int64_t cols) {
  const auto opts = dw.options().dtype(acc);
  Packed p;
  p.hidden_pad = round_up(d.hidden, cols), p.out_pad = round_up(d.C_out, cols);
  const auto padded = [&](const Tensor& t, int64_t rows, int64_t cols_pad) {
    Tensor out = at::zeros({rows, cols_pad}, opts);
    out.narrow(1, 0, t.size(1)).copy_(t);
    return out;
  };
  if (present(ew)) {
    p.expand_w = padded(ew->t(), d.C_in, p.hidden_pad);
    p.expand_b = padded(eb->view({1, d.hidden}), 1, p.hidden_pad);
  }
  p.dw_w = padded(dw.reshape({d.hidden, 9}).t(), 9, p.hidden_pad);
  p.dw_b = padded(db.view({1, d.hidden}), 1, p.hidden_pad);
  p.project_w = at::zeros({p.hidden_pad, p.out_pad}, opts);
  p.project_w.narrow(0, 0, d.hidden).narrow(1, 0, d.C_out).copy_(pw.t());
  p.project_b = padded(pb.view({1, d.C_out}), 1, p.out_pad);
  return p;
}

template <typename A>
void run_band(const Kernels<A>& k, const Dims& d, const Packed& p, bool residual, const A* x,
              A* y, int64_t n, int64_t r_begin, int64_t r_end) {
  const int64_t s = d.stride, W = d.W, Hp = p.hidden_pad, Op = p.out_pad;
  const int64_t step = std::min(std::max<int64_t>(1, kPixelsPerStep / d.Wo), r_end - r_begin);
  const int64_t row_elems = W * Hp;
  std::vector<A> expanded(((step - 1) * s + 3) * row_elems), dw(step * d.Wo * Hp),
      proj(step * d.Wo * Op);
  const A* xn = x + n * d.H * W * d.C_in;
  int64_t kept_lo = 0, kept_n = 0;  // input rows [kept_lo, kept_lo + kept_n) in `expanded`
  for (int64_t r = r_begin; r < r_end; r += step) {
    const int64_t g = std::min(step, r_end - r);
    const int64_t lo = std::max<int64_t>(r * s - 1, 0);
    const int64_t hi = std::min((r + g - 1) * s + 1, d.H - 1);
    int64_t reused = 0;
    if (kept_n > 0 && lo < kept_lo + kept_n) {
      reused = kept_lo + kept_n - lo;
      std::memmove(expanded.data(), expanded.data() + (lo - kept_lo) * row_elems,
                   reused * row_elems * sizeof(A));
    }
    const int64_t first = lo + reused, count = hi + 1 - first;
    A* dst = expanded.data() + reused * row_elems;
    const A* src = xn + first * W * d.C_in;
    if (p.expand_w.defined()) {
      k.gemm_bias_act[2](src, count * W, d.C_in, d.C_in, ptr<const A>(p.expand_w), Hp,
                         ptr<const A>(p.expand_b), dst);
    } else {
      for (int64_t i = 0; i < count * W; ++i) {
        std::memcpy(dst + i * Hp, src + i * d.C_in, d.C_in * sizeof(A));
        std::memset(dst + i * Hp + d.C_in, 0, (Hp - d.C_in) * sizeof(A));
      }
    }
    kept_lo = lo, kept_n = hi + 1 - lo;
    for (int64_t j = 0; j < g; ++j) {
      const A* rows[3];
      for (int kh = 0; kh < 3; ++kh) {
        const int64_t ih = (r + j) * s - 1 + kh;
        rows[kh] = (ih < 0 || ih >= d.H) ? nullptr : expanded.data() + (ih - lo) * row_elems;
      }
      k.depthwise3x3_row[2](rows, W, d.Wo, s, Hp, ptr<const A>(p.dw_w), ptr<const A>(p.dw_b),
                            dw.data() + j * d.Wo * Hp);
    }
    const int64_t pixels = g * d.Wo;
    k.gemm_bias_act[0](dw.data(), pixels, Hp, Hp, ptr<const A>(p.project_w), Op,
                       ptr<const A>(p.project_b), proj.data());
    A* out = y + ((n * d.Ho + r) * d.Wo) * d.C_out;
    const A* res = residual ? xn + r * W * d.C_in : nullptr;  // stride 1: same pixels
    for (int64_t i = 0; i < pixels; ++i) {
      const A* __restrict pr = proj.data() + i * Op;
      A* __restrict o = out + i * d.C_out;
      if (res != nullptr) {
        for (int64_t c = 0; c < d.C_out; ++c) o[c] = pr[c] + res[i * d.C_in + c];
      } else {
        std::memcpy(o, pr, d.C_out * sizeof(A));
      }
    }
  }
}

Tensor inverted_residual(const Tensor& input, const OptTensor& expand_weight,
                         const OptTensor& expand_bias, const Tensor& depthwise_weight,
                         const Tensor& depthwise_bias, const Tensor& project_weight,
                         const Tensor& project_bias, int64_t stride, bool residual) {
  const Dims d = check_args(input, expand_weight, expand_bias, depthwise_weight, depthwise_bias,
                            project_weight, project_bias, stride, residual);
  const bool channels_last = input.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                             !input.is_contiguous();
  const auto out_format = channels_last ? at::MemoryFormat::ChannelsLast
                                        : at::MemoryFormat::Contiguous;
  if (d.N == 0)
    return at::empty({0, d.C_out, d.Ho, d.Wo}, input.options().memory_format(out_format));
  const auto acc = acc_dtype(input.scalar_type());
  // The kernels read channels_last rows in the accumulation dtype.
  Tensor x = input.to(acc).contiguous(at::MemoryFormat::ChannelsLast);
  Tensor y = at::empty({d.N, d.C_out, d.Ho, d.Wo},
                       x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto run = [&](auto tag) {
    using A = typename decltype(tag)::type;
    const auto& k = kernels<A>();
    const Packed p = pack(d, expand_weight, expand_bias, depthwise_weight, depthwise_bias,
                          project_weight, project_bias, acc, k.gemm_cols);
    // Enough tasks for every thread; a band of at least 2 rows keeps the
    // recomputed halo small.
    const int64_t wanted = 4 * at::get_num_threads();
    const int64_t bands = std::min(std::max<int64_t>(1, (wanted + d.N - 1) / d.N),
                                   std::max<int64_t>(1, d.Ho / 2));
    const A* px = ptr<const A>(x);
    A* py = ptr<A>(y);
    at::parallel_for(0, d.N * bands, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t / bands, b = t % bands;
        run_band<A>(k, d, p, residual, px, py, n, b * d.Ho / bands, (b + 1) * d.Ho / bands);
      }
    });
  };
  if (acc == at::kDouble) {
    run(Tag<double>{});
  } else {
    run(Tag<float>{});
  }
  return y.to(input.scalar_type()).contiguous(out_format);
}

}  // namespace

TORCH_LIBRARY_IMPL(normops, CPU, m) { m.impl("inverted_residual", &inverted_residual); }

}  // namespace cpu
}  // namespace normops
