// The fused inference inverted residual on the CPU. Work is split over
// (image, band of output rows); each task walks its band a few output rows
// at a time, keeping the expanded rows it needs (plus the halo) in a per-task
// buffer: expand (GEMM + ReLU6) only the rows not kept from the previous
// step, depthwise + ReLU6 into a second buffer, project (GEMM) and write the
// output with the residual. The expanded tensor never exists in full: the
// buffers hold a few rows, in L2. Computed in float (float64 for float64
// input), reading and writing NCHW or channels_last in place.
#include <torch/library.h>

#include <cstring>
#include <list>
#include <mutex>
#include <vector>

#include "../inverted_residual.h"
#include "common.h"

namespace normops {
namespace cpu {
namespace {

using namespace inverted_residual;

constexpr int64_t kPixelsPerStep = 192;    // output pixels per project GEMM
constexpr int64_t kMinChunkChannels = 64;  // narrower chunks make narrow GEMMs

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

// Packing costs about as much as the whole block at batch 1, so packed
// weights are cached. An entry is found by the weight tensors' identity
// (weak references: a freed tensor's slot cannot be reused by a new one) and
// used only if every weight still holds what was packed (same_values):
// changes that bypass version counters (through .data, as gradcheck makes)
// are seen too. The comparison reads the weights once, a fraction of what
// packing them costs.
class PackCache {
 public:
  template <typename MakePacked>
  Packed get(const std::vector<Tensor>& weights, at::ScalarType acc, int64_t cols,
             MakePacked make) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->holds(weights, acc, cols)) {
        entries_.splice(entries_.begin(), entries_, it);
        return entries_.front().packed;
      }
    }
    // Entries of freed weights can never match again (eval with weights that
    // require grad folds new ones on every call): drop them.
    entries_.remove_if([](const Entry& e) { return e.expired(); });
    Entry entry{acc, cols, {}, make()};
    for (const Tensor& w : weights)
      entry.parts.push_back({c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr()),
                             w.unsafeGetTensorImpl(), w.contiguous().clone()});
    entries_.push_front(std::move(entry));
    if (entries_.size() > kCapacity) entries_.pop_back();
    return entries_.front().packed;
  }

 private:
  static constexpr size_t kCapacity = 64;  // every block of a few networks
  struct Part {
    c10::weak_intrusive_ptr<c10::TensorImpl> alive;
    const c10::TensorImpl* impl;
    Tensor contents;  // what was packed
  };
  struct Entry {
    at::ScalarType acc;
    int64_t cols;
    std::vector<Part> parts;
    Packed packed;
    bool expired() const {
      for (const Part& part : parts)
        if (part.alive.expired()) return true;
      return false;
    }
    bool holds(const std::vector<Tensor>& weights, at::ScalarType a, int64_t c) const {
      if (acc != a || cols != c || parts.size() != weights.size()) return false;
      for (size_t i = 0; i < parts.size(); ++i) {
        const Tensor& w = weights[i];
        const Part& part = parts[i];
        if (part.alive.expired() || part.impl != w.unsafeGetTensorImpl()) return false;
      }
      for (size_t i = 0; i < parts.size(); ++i)
        if (!same_values(weights[i], parts[i].contents)) return false;
      return true;
    }
  };
  std::mutex mutex_;
  std::list<Entry> entries_;
};

// Element offsets of an image, a channel and a pixel (h * W + w) in a
// (N, C, H, W) tensor: NCHW planes or channels_last rows, read and written
// in place (no layout copy around the kernel).
struct Strides {
  int64_t n, c, p;
  static Strides of(const Tensor& t) {
    const int64_t C = t.size(1), HW = t.size(2) * t.size(3);
    return t.is_contiguous() ? Strides{C * HW, HW, 1} : Strides{C * HW, 1, C};
  }
};

// One task: image n, output rows [r_begin, r_end), hidden channels
// [h0, h1) (multiples of the GEMM column block). With all the hidden channels
// it writes y (+ bias and residual); with a chunk of them it writes that
// chunk's share of the projection, without bias, pixel-major to `partial`.
struct Task {
  int64_t n, r_begin, r_end, chunk, h0, h1;
};

template <typename A>
void run_task(const Kernels<A>& k, const Dims& d, const Packed& p, bool residual, const A* x,
              Strides xs, const Task& t, A* y, Strides ys, A* partial, const A* zeros) {
  const int64_t s = d.stride, W = d.W, Hp = p.hidden_pad, Op = p.out_pad;
  const int64_t Hc = t.h1 - t.h0;
  const bool whole = Hc == Hp;
  const int64_t step = std::min(std::max<int64_t>(1, kPixelsPerStep / d.Wo), t.r_end - t.r_begin);
  const int64_t row_elems = W * Hc, max_rows = (step - 1) * s + 3;
  std::vector<A> expanded(max_rows * row_elems), dw(step * d.Wo * Hc);
  std::vector<A> proj(whole ? step * d.Wo * Op : 0);
  std::vector<A> rows_in(xs.c == 1 ? 0 : max_rows * W * d.C_in);  // NCHW input, as rows
  const A* xn = x + t.n * xs.n;
  A* yn = y + t.n * ys.n;
  int64_t kept_lo = 0, kept_n = 0;  // input rows [kept_lo, kept_lo + kept_n) in `expanded`
  for (int64_t r = t.r_begin; r < t.r_end; r += step) {
    const int64_t g = std::min(step, t.r_end - r);
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
    if (xs.c != 1) {  // gather the planes' rows into channels-innermost rows
      for (int64_t c = 0; c < d.C_in; ++c) {
        const A* __restrict plane = xn + c * xs.c + first * W;
        A* __restrict row = rows_in.data() + c;
        for (int64_t i = 0; i < count * W; ++i) row[i * d.C_in] = plane[i];
      }
      src = rows_in.data();
    }
    if (p.expand_w.defined()) {
      k.gemm_bias_act[2](src, count * W, d.C_in, d.C_in, ptr<const A>(p.expand_w) + t.h0, Hp,
                         Hc, ptr<const A>(p.expand_b) + t.h0, dst);
    } else {  // expansion 1: the input's channels [h0, h1), zero-padded
      const int64_t copied = std::max<int64_t>(0, std::min(t.h1, d.C_in) - t.h0);
      for (int64_t i = 0; i < count * W; ++i) {
        std::memcpy(dst + i * Hc, src + i * d.C_in + t.h0, copied * sizeof(A));
        std::memset(dst + i * Hc + copied, 0, (Hc - copied) * sizeof(A));
      }
    }
    kept_lo = lo, kept_n = hi + 1 - lo;
    for (int64_t j = 0; j < g; ++j) {
      const A* rows[3];
      for (int kh = 0; kh < 3; ++kh) {
        const int64_t ih = (r + j) * s - 1 + kh;
        rows[kh] = (ih < 0 || ih >= d.H) ? nullptr : expanded.data() + (ih - lo) * row_elems;
      }
      k.depthwise3x3_row[2](rows, W, d.Wo, s, Hc, ptr<const A>(p.dw_w) + t.h0, Hp,
                            ptr<const A>(p.dw_b) + t.h0, dw.data() + j * d.Wo * Hc);
    }
    const int64_t pixels = g * d.Wo, p0 = r * d.Wo;  // p0: first output pixel in the image
    const A* pw = ptr<const A>(p.project_w) + t.h0 * Op;
    if (!whole) {
      const int64_t all_pixels = d.N * d.Ho * d.Wo;
      k.gemm_bias_act[0](dw.data(), pixels, Hc, Hc, pw, Op, Op, zeros,
                         partial + (t.chunk * all_pixels + t.n * d.Ho * d.Wo + p0) * Op);
      continue;
    }
    k.gemm_bias_act[0](dw.data(), pixels, Hc, Hc, pw, Op, Op, ptr<const A>(p.project_b),
                       proj.data());
    // The residual (stride 1) reads the input at the same pixels. The output
    // has the input's layout: channels_last rows or NCHW planes for both.
    if (ys.c == 1) {
      for (int64_t i = 0; i < pixels; ++i) {
        const A* __restrict pr = proj.data() + i * Op;
        A* __restrict o = yn + (p0 + i) * ys.p;
        if (residual) {
          const A* __restrict xr = xn + (p0 + i) * xs.p;
          for (int64_t c = 0; c < d.C_out; ++c) o[c] = pr[c] + xr[c];
        } else {
          std::memcpy(o, pr, d.C_out * sizeof(A));
        }
      }
    } else {
      for (int64_t c = 0; c < d.C_out; ++c) {
        A* __restrict o = yn + c * ys.c + p0;
        const A* __restrict xr = xn + c * xs.c + p0;
        for (int64_t i = 0; i < pixels; ++i) o[i] = proj[i * Op + c] + (residual ? xr[i] : A(0));
      }
    }
  }
}

// y = sum of the chunks' partial projections + bias (+ residual).
template <typename A>
void reduce_chunks(const Dims& d, const Packed& p, bool residual, const A* x, Strides xs,
                   const A* partial, int64_t chunks, A* y, Strides ys) {
  const int64_t image = d.Ho * d.Wo, pixels = d.N * image, Op = p.out_pad;
  const A* bias = ptr<const A>(p.project_b);
  at::parallel_for(0, pixels, 256, [&](int64_t p0, int64_t p1) {
    for (int64_t i = p0; i < p1; ++i) {
      const int64_t n = i / image, px = i % image;
      for (int64_t c = 0; c < d.C_out; ++c) {
        A v = bias[c] + (residual ? x[n * xs.n + c * xs.c + px * xs.p] : A(0));
        for (int64_t ch = 0; ch < chunks; ++ch) v += partial[(ch * pixels + i) * Op + c];
        y[n * ys.n + c * ys.c + px * ys.p] = v;
      }
    }
  });
}

// Tasks for every thread: whole images while there are enough of them;
// else chunks of the hidden channels (no recomputation; each adds a share of
// the projection) and, if still too few, bands of output rows (their halo
// rows are expanded twice).
std::vector<Task> plan(const Dims& d, int64_t hidden_pad, int64_t cols, int64_t* chunks) {
  const int64_t wanted = 2 * at::get_num_threads();
  const int64_t col_blocks = hidden_pad / cols;
  *chunks = d.N >= wanted ? 1
                          : std::min((wanted + d.N - 1) / d.N,
                                     std::max<int64_t>(1, hidden_pad / kMinChunkChannels));
  const int64_t bands = std::min(std::max<int64_t>(1, (wanted + d.N * *chunks - 1) / (d.N * *chunks)),
                                 std::max<int64_t>(1, d.Ho / 2));
  std::vector<Task> tasks;
  for (int64_t n = 0; n < d.N; ++n)
    for (int64_t b = 0; b < bands; ++b)
      for (int64_t c = 0; c < *chunks; ++c)
        tasks.push_back({n, b * d.Ho / bands, (b + 1) * d.Ho / bands, c,
                         c * col_blocks / *chunks * cols, (c + 1) * col_blocks / *chunks * cols});
  return tasks;
}

Tensor inverted_residual(const Tensor& input, const OptTensor& expand_weight,
                         const OptTensor& expand_bias, const Tensor& depthwise_weight,
                         const Tensor& depthwise_bias, const Tensor& project_weight,
                         const Tensor& project_bias, int64_t stride, bool residual) {
  const Dims d = check_args(input, expand_weight, expand_bias, depthwise_weight, depthwise_bias,
                            project_weight, project_bias, stride, residual);
  // channels_last as given, or as torch suggests for other strides (a
  // sliced channels_last tensor), where torch's block returns it.
  const bool channels_last =
      !input.is_contiguous() && (input.is_contiguous(at::MemoryFormat::ChannelsLast) ||
                                 input.suggest_memory_format() == at::MemoryFormat::ChannelsLast);
  const auto out_format = channels_last ? at::MemoryFormat::ChannelsLast
                                        : at::MemoryFormat::Contiguous;
  if (d.N == 0)
    return at::empty({0, d.C_out, d.Ho, d.Wo}, input.options().memory_format(out_format));
  const auto acc = acc_dtype(input.scalar_type());
  // In the accumulation dtype, NCHW or channels_last (others copied into
  // the output's layout).
  Tensor x = input.to(acc);
  if (!x.is_contiguous() && !x.is_contiguous(at::MemoryFormat::ChannelsLast))
    x = x.contiguous(out_format);
  Tensor y = at::empty({d.N, d.C_out, d.Ho, d.Wo}, x.options().memory_format(out_format));
  const Strides xs = Strides::of(x), ys = Strides::of(y);
  const auto run = [&](auto tag) {
    using A = typename decltype(tag)::type;
    const auto& k = kernels<A>();
    static PackCache cache;
    std::vector<Tensor> weights{depthwise_weight, depthwise_bias, project_weight, project_bias};
    if (present(expand_weight)) weights.insert(weights.end(), {*expand_weight, *expand_bias});
    const Packed p = cache.get(weights, acc, k.gemm_cols, [&] {
      return pack(d, expand_weight, expand_bias, depthwise_weight, depthwise_bias,
                  project_weight, project_bias, acc, k.gemm_cols);
    });
    int64_t chunks = 1;
    const std::vector<Task> tasks = plan(d, p.hidden_pad, k.gemm_cols, &chunks);
    Tensor partial, zeros;
    if (chunks > 1) {
      partial = at::empty({chunks, d.N * d.Ho * d.Wo, p.out_pad}, x.options());
      zeros = at::zeros({p.out_pad}, x.options());
    }
    const A* px = ptr<const A>(x);
    A* py = ptr<A>(y);
    A* pp = chunks > 1 ? ptr<A>(partial) : nullptr;
    const A* pz = chunks > 1 ? ptr<const A>(zeros) : nullptr;
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        run_task<A>(k, d, p, residual, px, xs, tasks[t], py, ys, pp, pz);
    });
    if (chunks > 1) reduce_chunks<A>(d, p, residual, px, xs, pp, chunks, py, ys);
  };
  if (acc == at::kDouble) {
    run(Tag<double>{});
  } else {
    run(Tag<float>{});
  }
  return y.to(input.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(normops, CPU, m) { m.impl("inverted_residual", &inverted_residual); }

}  // namespace cpu
}  // namespace normops
