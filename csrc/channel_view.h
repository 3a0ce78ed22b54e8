// How the (N, C, *) inputs of batch, group and instance norm are walked, on
// any device: as N*C contiguous planes of HW elements (NCHW), or as N*HW rows
// of C contiguous channels (channels_last, or one spatial element). Outputs
// keep the input's strides; other strides are copied first into the layout
// torch suggests for them (channels_last for a sliced channels_last tensor),
// which torch's output takes.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

namespace normops {

using at::Tensor;

struct ChannelView {
  Tensor x;
  bool rows;
  int64_t N, C, HW;
};

// channels_last / channels_last_3d (torch keeps those layouts, and only
// those: a transposed (N, L, C) 3-D input gets a contiguous output).
inline bool is_channels_last_dense(const Tensor& t) {
  if (t.dim() < 4) return false;
  const int64_t C = t.size(1);
  if (C != 1 && t.stride(1) != 1) return false;
  int64_t expected = C;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return t.size(0) == 1 || t.stride(0) == expected;
}

inline ChannelView channel_view(const Tensor& input) {
  ChannelView v;
  v.N = input.size(0);
  v.C = input.size(1);
  v.HW = 1;
  for (int64_t d = 2; d < input.dim(); ++d) v.HW *= input.size(d);
  if (input.is_contiguous()) {
    v.x = input;
    v.rows = v.HW == 1;
  } else if (is_channels_last_dense(input)) {
    v.x = input;
    v.rows = true;
  } else {
    v.x = input.contiguous(input.suggest_memory_format());
    v.rows = v.HW == 1 || !v.x.is_contiguous();
  }
  return v;
}

// The output of an elementwise step over `v`: same sizes and strides.
inline Tensor like(const ChannelView& v) { return at::empty_like(v.x); }

// Layout-matching copy of a gradient: kernels read dy with x's strides.
inline Tensor match_layout(const Tensor& dy, const ChannelView& v) {
  TORCH_CHECK(dy.sizes() == v.x.sizes(), "normops: expected grad_output of shape ", v.x.sizes(),
              ", but got ", dy.sizes());
  if (dy.strides() == v.x.strides()) return dy;
  Tensor t = at::empty_like(v.x, dy.options());
  t.copy_(dy);
  return t;
}

}  // namespace normops
