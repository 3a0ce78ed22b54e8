// The inference-mode MobileNetV2 inverted residual with its batch norms
// folded into the convolutions: argument checks and output shape, shared by
// the CPU and CUDA kernels.
//
//   h = relu6(expand_weight . x + expand_bias)        (skipped without expand_weight)
//   d = relu6(depthwise3x3(h, stride, padding 1) + depthwise_bias)
//   y = project_weight . d + project_bias (+ x when residual)
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace normops {
namespace inverted_residual {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

constexpr const char* kOp = "normops.inverted_residual";

struct Dims {
  int64_t N, C_in, H, W, hidden, C_out, Ho, Wo, stride;
};

inline int64_t out_size(int64_t in, int64_t stride) { return (in - 1) / stride + 1; }

inline Dims check_args(const Tensor& input, const OptTensor& expand_weight,
                       const OptTensor& expand_bias, const Tensor& depthwise_weight,
                       const Tensor& depthwise_bias, const Tensor& project_weight,
                       const Tensor& project_bias, int64_t stride, bool residual) {
  TORCH_CHECK(input.dim() == 4, kOp, ": expected a 4-D (N, C, H, W) input, but got ",
              input.dim(), "-D");
  check_input(input, 4, kOp);
  TORCH_CHECK(stride == 1 || stride == 2, kOp, ": stride must be 1 or 2, but got ", stride);
  Dims d{};
  d.N = input.size(0), d.C_in = input.size(1), d.H = input.size(2), d.W = input.size(3);
  d.stride = stride;
  TORCH_CHECK(d.H > 0 && d.W > 0 && d.C_in > 0, kOp,
              ": expected non-empty channel and spatial dims, but got input of size ",
              input.sizes());
  TORCH_CHECK(present(expand_weight) == present(expand_bias), kOp,
              ": expand_weight and expand_bias must both be given or both be None");
  d.hidden = present(expand_weight) ? expand_weight->size(0) : d.C_in;
  if (present(expand_weight))
    TORCH_CHECK(expand_weight->dim() == 2 && expand_weight->size(1) == d.C_in, kOp,
                ": expected expand_weight of shape [hidden, ", d.C_in, "], but got ",
                expand_weight->sizes());
  d.C_out = project_weight.size(0);
  const auto param = [&](const OptTensor& t, at::IntArrayRef shape, const char* name) {
    if (!present(t)) return;
    check_same_device(input, *t, kOp, name);
    TORCH_CHECK(t->sizes() == shape, kOp, ": expected ", name, " of shape ", shape,
                ", but got ", t->sizes());
    TORCH_CHECK(t->is_floating_point(), kOp, ": expected ", name,
                " to be floating point, but got ", t->scalar_type());
  };
  param(expand_weight, {d.hidden, d.C_in}, "expand_weight");
  param(expand_bias, {d.hidden}, "expand_bias");
  param(depthwise_weight, {d.hidden, 3, 3}, "depthwise_weight");
  param(depthwise_bias, {d.hidden}, "depthwise_bias");
  param(project_weight, {d.C_out, d.hidden}, "project_weight");
  param(project_bias, {d.C_out}, "project_bias");
  TORCH_CHECK(!residual || (stride == 1 && d.C_out == d.C_in), kOp,
              ": the residual needs stride 1 and as many output as input channels (got stride ",
              stride, ", ", d.C_in, " -> ", d.C_out, ")");
  d.Ho = out_size(d.H, stride), d.Wo = out_size(d.W, stride);
  return d;
}

}  // namespace inverted_residual
}  // namespace normops
