// Depthwise 3x3 convolution (padding 1, stride 1 or 2, no bias) on the CPU,
// forward and backward, for the inverted residual's training path: ATen's CPU
// depthwise convolution runs at a small fraction of memory bandwidth (its
// NCHW path several times slower still). NCHW is computed plane by plane,
// channels_last row by row with the channels in vectors; float32 and
// float64. An input norm (the batch norm and activation of the layer
// before) is applied to the input as it is read, so its output, the largest
// tensor of the block, is never stored.
#include <torch/library.h>

#include <vector>

#include "channel_norm.h"

namespace normops {
namespace cpu {
namespace {

constexpr const char* kOp = "normops.depthwise_conv3x3";

void check_depthwise(const Tensor& input, const Tensor& weight, int64_t stride) {
  TORCH_CHECK(input.dim() == 4, kOp, ": expected a 4-D (N, C, H, W) input, but got ",
              input.dim(), "-D");
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, kOp,
              ": expected a float32 or float64 input, but got ", dt);
  const int64_t C = input.size(1);
  // As torch's convolution: no empty channel or spatial dim (an empty batch
  // is fine).
  TORCH_CHECK(C > 0 && input.size(2) > 0 && input.size(3) > 0, kOp,
              ": expected non-empty channel and spatial dims, but got input of size ",
              input.sizes());
  check_param(input, weight, {C, 1, 3, 3}, kOp, "weight");
  TORCH_CHECK(weight.scalar_type() == dt, kOp, ": expected weight to have dtype ", dt,
              ", but got ", weight.scalar_type());
  TORCH_CHECK(stride == 1 || stride == 2, kOp, ": stride must be 1 or 2, but got ", stride);
}

// The input norm: act((x - mean) * invstd * weight + bias) per channel,
// folded as batch_norm_elemt folds it (the same values, so the batch-norm
// backward's activation mask is the one the convolution saw). Off without
// statistics.
template <typename A>
struct InputNorm {
  batch_norm::Folded folded;  // owns the constants
  const A* mean = nullptr;
  const A* scale = nullptr;
  const A* bias = nullptr;
  int act = 0;
};

template <typename A>
InputNorm<A> input_norm(const Tensor& input, const OptTensor& mean, const OptTensor& var,
                        const OptTensor& weight, const OptTensor& bias, double eps,
                        int64_t activation) {
  InputNorm<A> norm;
  if (!present(mean)) return norm;
  norm.folded = fold_batch_norm(*mean, *var, weight, bias, eps, input.scalar_type());
  norm.mean = ptr<const A>(norm.folded.acc_mean);
  norm.scale = ptr<const A>(norm.folded.acc_scale);
  norm.bias = ptr<const A>(norm.folded.acc_bias);
  norm.act = act_index(activation);
  return norm;
}

void check_input_norm(const Tensor& input, const OptTensor& mean, const OptTensor& var,
                      const OptTensor& weight, const OptTensor& bias, int64_t activation) {
  act_index(activation);
  TORCH_CHECK(present(mean) == present(var), kOp,
              ": expected both norm_mean and norm_var, or neither");
  TORCH_CHECK(present(mean) || !(present(weight) || present(bias)), kOp,
              ": norm_weight and norm_bias need norm_mean and norm_var");
  const int64_t C = input.size(1);
  if (present(mean)) check_vector(input, *mean, C, kOp, "norm_mean");
  if (present(var)) check_vector(input, *var, C, kOp, "norm_var");
  check_param(input, weight, {C}, kOp, "norm_weight");
  check_param(input, bias, {C}, kOp, "norm_bias");
}

// The input as the channel norms walk it (csrc/channel_view.h: NCHW planes,
// or channels_last rows), with its spatial sizes and the output's.
struct Layout {
  ChannelView v;
  int64_t H, W, Ho, Wo;
};

Layout layout_of(const Tensor& input, int64_t stride) {
  const int64_t H = input.size(2), W = input.size(3);
  return {channel_view(input), H, W, (H - 1) / stride + 1, (W - 1) / stride + 1};
}

// The memory format of the output and the gradients, in which the kernels
// walk them as they walk the input. One spatial element is the same memory
// either way: contiguous then, as torch's convolution returns it.
at::MemoryFormat format_of(const Layout& l) {
  return l.v.rows && l.v.HW > 1 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

Tensor empty_as(const Layout& l, int64_t H, int64_t W) {
  return at::empty({l.v.N, l.v.C, H, W}, l.v.x.options(), format_of(l));
}

// The input rows (channels_last) that output row ho + 1 reads and row ho
// does not, [ho * stride + 2, + stride) of `image`: what the row kernels
// prefetch while they compute row ho (none past the image's last row).
template <typename A>
struct NextRows {
  const A* first;
  int64_t len;
};

template <typename A>
NextRows<A> next_input_rows(const Layout& l, int64_t stride, const A* image, int64_t ho) {
  const int64_t first = ho * stride + 2, row_len = l.W * l.v.C;
  const int64_t rows = std::max<int64_t>(0, std::min(first + stride, l.H) - first);
  return {rows > 0 ? image + first * row_len : nullptr, rows * row_len};
}

// Weights as the kernels read them: [C][9] for planes, [9][C] for rows,
// transposed in a plain loop: ATen's transposing copy took 15 us for 960
// channels, a tenth of the convolution of a 7x7 image.
template <typename A>
Tensor weight_for(const Tensor& weight, const Layout& l) {
  const Tensor w = weight.contiguous();
  if (!l.v.rows) return w;
  Tensor t = at::empty({9, l.v.C}, w.options());
  const A* src = ptr<const A>(w);
  A* dst = ptr<A>(t);
  for (int64_t c = 0; c < l.v.C; ++c)
    for (int64_t i = 0; i < 9; ++i) dst[i * l.v.C + c] = src[c * 9 + i];
  return t;
}

// The input the convolution reads, one NCHW plane or channels_last image at
// a time: the input's own memory, or with an input norm its normalised
// copy, made per plane, or per row in a ring of three (output row ho reads
// the three consecutive rows ho * stride - 1 + kh, and output rows are
// walked in order, so each row is made once).
template <typename A>
class NormedInput {
 public:
  NormedInput(const Layout& l, const InputNorm<A>& norm)
      : l_(l), norm_(norm), k_(kernels<A>()),
        buffer_(norm.mean ? static_cast<size_t>(l.v.rows ? 3 * l.W * l.v.C : l.H * l.W) : 0) {}

  // Plane p (n * C + c) of x.
  const A* plane(const A* x, int64_t p) {
    const A* src = x + p * l_.H * l_.W;
    if (!norm_.mean) return src;
    const int64_t c = p % l_.v.C;
    k_.span_affine[norm_.act](src, buffer_.data(), l_.H * l_.W, 0, 1, norm_.mean[c],
                              norm_.scale[c], norm_.bias[c]);
    return buffer_.data();
  }

  // The input rows of each tap kh of output row ho of image `image` (null
  // for padding).
  void taps(const A* image, int64_t ho, int64_t stride, const A* rows[3]) {
    if (image != image_) {
      image_ = image;
      held_[0] = held_[1] = held_[2] = -1;
    }
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t hi = tap_row(ho, kh, l_.H, stride);
      rows[kh] = hi < 0 ? nullptr : row(hi);
    }
  }

 private:
  const A* row(int64_t hi) {
    const int64_t len = l_.W * l_.v.C;
    const A* src = image_ + hi * len;
    if (!norm_.mean) return src;
    A* slot = buffer_.data() + (hi % 3) * len;
    if (held_[hi % 3] != hi) {
      k_.row_affine[norm_.act](src, slot, l_.W, l_.v.C, norm_.mean, norm_.scale, norm_.bias);
      held_[hi % 3] = hi;
    }
    return slot;
  }

  const Layout& l_;
  const InputNorm<A>& norm_;
  const Kernels<A>& k_;
  std::vector<A> buffer_;
  const A* image_ = nullptr;
  int64_t held_[3] = {-1, -1, -1};
};

Tensor depthwise_conv3x3(const Tensor& input, const Tensor& weight, int64_t stride,
                         const OptTensor& norm_mean, const OptTensor& norm_var,
                         const OptTensor& norm_weight, const OptTensor& norm_bias,
                         double norm_eps, int64_t norm_activation) {
  check_depthwise(input, weight, stride);
  check_input_norm(input, norm_mean, norm_var, norm_weight, norm_bias, norm_activation);
  const Layout l = layout_of(input, stride);
  Tensor out = empty_as(l, l.Ho, l.Wo);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(l.v.x.scalar_type(), kOp, [&] {
    using A = scalar_t;
    const auto& k = kernels<A>();
    const auto norm = input_norm<A>(input, norm_mean, norm_var, norm_weight, norm_bias,
                                    norm_eps, norm_activation);
    const Tensor w = weight_for<A>(weight, l);
    const A* x = ptr<const A>(l.v.x);
    const A* pw = ptr<const A>(w);
    A* y = ptr<A>(out);
    if (!l.v.rows) {
      at::parallel_for(0, l.v.N * l.v.C, grain_for(l.H * l.W), [&](int64_t p0, int64_t p1) {
        NormedInput<A> src(l, norm);
        for (int64_t p = p0; p < p1; ++p)
          k.depthwise_plane(src.plane(x, p), l.H, l.W, stride, pw + (p % l.v.C) * 9,
                            y + p * l.Ho * l.Wo);
      });
      return;
    }
    at::parallel_for(0, l.v.N * l.Ho, grain_for(l.Wo * l.v.C), [&](int64_t r0, int64_t r1) {
      NormedInput<A> src(l, norm);
      for (int64_t r = r0; r < r1; ++r) {  // row ho = r % Ho of image r / Ho
        const int64_t n = r / l.Ho, ho = r % l.Ho;
        const A* image = x + n * l.H * l.W * l.v.C;
        const A* rows[3];
        src.taps(image, ho, stride, rows);
        const auto next = next_input_rows(l, stride, image, ho);
        k.depthwise_row(rows, l.W, l.v.C, stride, pw, y + r * l.Wo * l.v.C, next.first, next.len);
      }
    });
  });
  return out;
}

// With an input norm, grad_input is the gradient at the convolution's
// input, the normalised tensor (what the norm's backward takes).
std::tuple<Tensor, Tensor> depthwise_conv3x3_backward(
    const Tensor& grad_out, const Tensor& input, const Tensor& weight, int64_t stride,
    std::array<bool, 2> output_mask, const OptTensor& norm_mean, const OptTensor& norm_var,
    const OptTensor& norm_weight, const OptTensor& norm_bias, double norm_eps,
    int64_t norm_activation) {
  check_depthwise(input, weight, stride);
  check_input_norm(input, norm_mean, norm_var, norm_weight, norm_bias, norm_activation);
  const Layout l = layout_of(input, stride);
  check_same_device(input, grad_out, kOp, "grad_output");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({l.v.N, l.v.C, l.Ho, l.Wo}), kOp,
              ": expected grad_output of shape ", at::IntArrayRef({l.v.N, l.v.C, l.Ho, l.Wo}),
              ", but got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), kOp,
              ": expected grad_output to have the input's dtype ", input.scalar_type(),
              ", but got ", grad_out.scalar_type());
  const Tensor dy = grad_out.contiguous(format_of(l));  // gradients arrive in any layout
  const bool need_dx = output_mask[0], need_dw = output_mask[1];
  Tensor grad_input = need_dx ? empty_as(l, l.H, l.W) : at::empty({0}, input.options());
  // Per-task partial weight gradients, summed in double.
  const int64_t tasks = l.v.rows ? num_chunks(l.v.N * l.Ho, grain_for(l.Wo * l.v.C))
                               : num_chunks(l.v.N * l.v.C, grain_for(l.Ho * l.Wo));
  std::vector<double> partial(need_dw ? static_cast<size_t>(tasks * l.v.C * 9) : 0, 0.0);
  const bool empty = dy.numel() == 0 || input.numel() == 0;
  AT_DISPATCH_FLOATING_TYPES(l.v.x.scalar_type(), kOp, [&] {
    using A = scalar_t;
    if (empty || !(need_dx || need_dw)) return;
    const auto& k = kernels<A>();
    const A* x = ptr<const A>(l.v.x);
    const A* g = ptr<const A>(dy);
    A* d = need_dx ? ptr<A>(grad_input) : nullptr;
    const Tensor w = weight_for<A>(weight, l);
    const A* pw = ptr<const A>(w);
    const auto norm = need_dw ? input_norm<A>(input, norm_mean, norm_var, norm_weight, norm_bias,
                                              norm_eps, norm_activation)
                              : InputNorm<A>{};
    // Both gradients in one walk over dy: each piece of dy feeds the weight
    // gradient and, while still in cache, the input gradient that needs it.
    if (!l.v.rows) {
      for_each_chunk(l.v.N * l.v.C, tasks, [&](int64_t t, int64_t p0, int64_t p1) {
        NormedInput<A> src(l, norm);
        for (int64_t p = p0; p < p1; ++p) {
          const A* gp = g + p * l.Ho * l.Wo;
          if (need_dx)
            k.depthwise_plane_grad_input(gp, l.H, l.W, stride, pw + (p % l.v.C) * 9,
                                         d + p * l.H * l.W);
          if (need_dw)
            k.depthwise_plane_grad_weight(gp, src.plane(x, p), l.H, l.W, stride,
                                          partial.data() + (t * l.v.C + p % l.v.C) * 9);
        }
      });
      return;
    }
    const int64_t in_image = l.H * l.W * l.v.C, out_image = l.Ho * l.Wo * l.v.C;
    for_each_chunk(l.v.N * l.Ho, tasks, [&](int64_t t, int64_t r0, int64_t r1) {
      NormedInput<A> src(l, norm);
      std::vector<A> row(need_dw ? static_cast<size_t>(9 * l.v.C) : 0);
      for (int64_t r = r0; r < r1; ++r) {  // row ho of image n
        const int64_t n = r / l.Ho, ho = r % l.Ho;
        if (need_dw) {
          const A* rows[3];
          src.taps(x + n * in_image, ho, stride, rows);
          const auto next = next_input_rows(l, stride, x + n * in_image, ho);
          k.depthwise_row_grad_weight(g + r * l.Wo * l.v.C, rows, l.W, l.v.C, stride,
                                      row.data(), partial.data() + t * l.v.C * 9, next.first,
                                      next.len);
        }
        if (need_dx) {
          // The input rows whose last output row (floor((hi + 1) / stride))
          // is ho, and at the last one the rest: all their dy rows are read.
          // Meanwhile the next output row's dy is fetched.
          const int64_t hi0 = std::max<int64_t>(0, ho * stride - 1);
          const int64_t hi1 = ho + 1 == l.Ho ? l.H : (ho + 1) * stride - 1;
          k.depthwise_rows_grad_input(g + n * out_image, l.H, l.W, l.v.C, stride, pw, hi0, hi1,
                                      d + n * in_image,
                                      r + 1 < r1 ? g + (r + 1) * l.Wo * l.v.C : nullptr,
                                      l.Wo * l.v.C);
        }
      }
    });
  });
  Tensor grad_weight = at::empty({0}, weight.options());
  if (need_dw) {
    // Sum the tasks; rows' partials are [9][C], planes' [C][9].
    std::vector<double> total(static_cast<size_t>(l.v.C * 9), 0.0);
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t c = 0; c < l.v.C; ++c)
        for (int64_t i = 0; i < 9; ++i)
          total[c * 9 + i] += partial[t * l.v.C * 9 + (l.v.rows ? i * l.v.C + c : c * 9 + i)];
    grad_weight = from_double(total.data(), {l.v.C, 1, 3, 3}, weight.options());
  }
  return {grad_input, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(normops, CPU, m) {
  m.impl("depthwise_conv3x3", &depthwise_conv3x3);
  m.impl("depthwise_conv3x3_backward", &depthwise_conv3x3_backward);
}

}  // namespace cpu
}  // namespace normops
