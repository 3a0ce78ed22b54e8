// Group norm, for any device, and instance norm as group norm with one
// channel per group: statistics per (n, group) over C/G channels and every
// spatial element, in the input's own layout (NCHW planes or channels_last
// rows, no copy), with a per-channel affine. Saves mean and rstd [N, G].
//
// GroupNormOps<B> checks the arguments and hands a ChannelView to the
// backend B (csrc/cpu/group_norm.cpp, csrc/cuda/group_norm.cu): B::forward
// returns (out, mean, rstd), B::backward (grad_input, grad_weight,
// grad_bias).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "channel_view.h"
#include "checks.h"

namespace normops {
namespace group_norm {

constexpr const char* kOp = "normops.group_norm";

inline void check_gn(const Tensor& input, int64_t groups, const OptTensor& weight,
                     const OptTensor& bias) {
  TORCH_CHECK(input.dim() >= 2, "Expected at least 2 dimensions for input tensor but received ",
              input.dim());
  check_input(input, 2, kOp);
  const int64_t C = input.size(1);
  TORCH_CHECK(groups > 0, kOp, ": num_groups must be positive, but got ", groups);
  TORCH_CHECK(C % groups == 0, "Expected number of channels in input to be divisible by ",
              "num_groups, but got input of shape ", input.sizes(), " and num_groups=", groups);
  check_param(input, weight, {C}, kOp, "weight");
  check_param(input, bias, {C}, kOp, "bias");
  check_one_param_dtype(input, {{"weight", &weight}, {"bias", &bias}}, kOp);
}

template <class B>
struct GroupNormOps {
  static std::tuple<Tensor, Tensor, Tensor> group_norm(const Tensor& input, int64_t groups,
                                                       const OptTensor& weight,
                                                       const OptTensor& bias, double eps) {
    check_gn(input, groups, weight, bias);
    return B::forward(channel_view(input), groups, weight, bias, eps);
  }

  static std::tuple<Tensor, Tensor, Tensor> group_norm_backward(
      const Tensor& grad_out, const Tensor& input, int64_t groups, const Tensor& mean,
      const Tensor& rstd, const OptTensor& weight, std::array<bool, 3> output_mask) {
    check_gn(input, groups, weight, std::nullopt);
    check_same_device(input, grad_out, kOp, "grad_output");
    TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), kOp,
                ": expected grad_output to have the input's dtype ", input.scalar_type(),
                ", but got ", grad_out.scalar_type());
    const int64_t N = input.size(0), G = groups;
    TORCH_CHECK(mean.numel() == N * G && rstd.numel() == N * G, kOp,
                ": expected mean and rstd of shape [", N, ", ", G, "]");
    check_same_device(input, mean, kOp, "mean");
    check_same_device(input, rstd, kOp, "rstd");
    ChannelView v = channel_view(input);
    return B::backward(v, G, match_layout(grad_out, v), mean, rstd, weight, output_mask);
  }
};

// Registers GroupNormOps<B> as a backend's kernels of the group-norm ops.
template <class B>
void register_kernels(torch::Library& m) {
  m.impl("group_norm", &GroupNormOps<B>::group_norm);
  m.impl("group_norm_backward", &GroupNormOps<B>::group_norm_backward);
}

}  // namespace group_norm
}  // namespace normops
