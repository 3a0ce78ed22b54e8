// Argument checks and small helpers shared by the CPU and CUDA op files, so
// that both backends reject bad input with the same messages, before any
// kernel runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace normops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

inline at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_reduced(at::ScalarType dt) { return dt == at::kBFloat16 || dt == at::kHalf; }

// Parameters and statistics as contiguous vectors of `opts` (the dtype the
// kernels read, on the input's device); an absent optional is `fill` repeated.
inline Tensor acc_vector(const OptTensor& t, int64_t n, const at::TensorOptions& opts,
                         double fill) {
  if (present(t)) return t->to(c10::typeMetaToScalarType(opts.dtype())).contiguous();
  return at::full({n}, fill, opts);
}

// The fused activation's code (normops::Act): 0 none, 1 ReLU, 2 ReLU6.
inline int act_index(int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation <= 2,
              "normops: activation must be 0 (none), 1 (relu) or 2 (relu6), but got ", activation);
  return static_cast<int>(activation);
}

inline void check_input(const Tensor& input, int64_t min_dim, const char* op) {
  TORCH_CHECK(input.dim() >= min_dim, op, ": expected an input with at least ", min_dim,
              " dimensions, but got ", input.dim());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || is_reduced(dt), op,
              ": expected a floating point input (float32, float64, bfloat16 or float16), but got ",
              dt);
}

inline void check_same_device(const Tensor& input, const Tensor& t, const char* op,
                              const char* name) {
  TORCH_CHECK(input.device() == t.device(), op, ": expected ", name,
              " to be on the same device as input (", input.device(), "), but got ", t.device());
}

// A statistic or running buffer: n values of any floating dtype in one
// dimension, on the device of `like`.
inline void check_vector(const Tensor& like, const Tensor& t, int64_t n, const char* op,
                         const char* name) {
  check_same_device(like, t, op, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && at::isFloatingType(t.scalar_type()), op,
              ": expected ", name, " to be a floating point vector of ", n, " values, but got ",
              t.scalar_type(), " of shape ", t.sizes());
}

// A per-channel (or per-element) parameter: `shape`, on the input's device,
// and a dtype the kernels accept with `input`: the input's, or float32 for
// bfloat16/float16 input (the mixed precision AMP produces).
inline void check_param(const Tensor& input, const OptTensor& p, at::IntArrayRef shape,
                        const char* op, const char* name) {
  if (!present(p)) return;
  check_same_device(input, *p, op, name);
  TORCH_CHECK(p->sizes() == shape, op, ": expected ", name, " of shape ", shape, ", but got ",
              p->sizes());
  const auto dt = input.scalar_type();
  TORCH_CHECK(p->scalar_type() == dt || (is_reduced(dt) && p->scalar_type() == at::kFloat), op,
              ": expected ", name, " to have dtype ", dt, is_reduced(dt) ? " or float32" : "",
              " (the input's), but got ", p->scalar_type());
}

// Mixed precision takes one parameter dtype: with a bfloat16 or float16
// input, every present parameter (and running statistic) float32, or every
// one the input's dtype, as torch's CPU kernels require. (check_param admits
// each of the two.)
inline void check_one_param_dtype(
    const Tensor& input, std::initializer_list<std::pair<const char*, const OptTensor*>> params,
    const char* op) {
  if (!is_reduced(input.scalar_type())) return;
  const char* first = nullptr;
  at::ScalarType dt = at::kFloat;
  for (const auto& [name, p] : params) {
    if (!present(*p)) continue;
    if (first == nullptr) {
      first = name;
      dt = (*p)->scalar_type();
      continue;
    }
    TORCH_CHECK((*p)->scalar_type() == dt, op, ": expected ", name, " to have the dtype of ", first,
                " (", dt, "): mixed precision takes float32 or the input's dtype for all of them, "
                "but got ", (*p)->scalar_type());
  }
}

// Layer norm over the trailing `shape` of `input`: checks the arguments and
// returns (rows, D).
inline std::pair<int64_t, int64_t> check_layer_norm(const Tensor& input, at::IntArrayRef shape,
                                                    const OptTensor& weight,
                                                    const OptTensor& bias, const char* op) {
  check_input(input, 1, op);
  const int64_t nd = static_cast<int64_t>(shape.size());
  TORCH_CHECK(nd >= 1, op, ": normalized_shape must have at least one dimension");
  const int64_t axis = input.dim() - nd;
  bool match = axis >= 0;
  for (int64_t i = 0; match && i < nd; ++i) match = input.size(axis + i) == shape[i];
  if (!match) {
    std::string expected;
    for (auto d : shape) expected += ", " + std::to_string(d);
    TORCH_CHECK(false, "Given normalized_shape=", shape, ", expected input with shape [*",
                expected, "], but got input of size", input.sizes());
  }
  check_param(input, weight, shape, op, "weight");
  check_param(input, bias, shape, op, "bias");
  check_one_param_dtype(input, {{"weight", &weight}, {"bias", &bias}}, op);
  int64_t D = 1, rows = 1;
  for (auto d : shape) D *= d;
  for (int64_t i = 0; i < axis; ++i) rows *= input.size(i);
  return {rows, D};
}

// The rest of layer norm's backward arguments: grad_output like the input,
// one mean and rstd per row.
inline void check_layer_norm_backward(const Tensor& grad_out, const Tensor& input,
                                      const Tensor& mean, const Tensor& rstd, int64_t rows,
                                      const char* op) {
  check_same_device(input, grad_out, op, "grad_output");
  TORCH_CHECK(grad_out.sizes() == input.sizes() && grad_out.scalar_type() == input.scalar_type(),
              op, ": expected grad_output of the input's shape and dtype");
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows, op,
              ": expected mean and rstd with one value per row (", rows, ")");
  check_same_device(input, mean, op, "mean");
  check_same_device(input, rstd, op, "rstd");
}

// Shape of layer norm's mean and rstd: the leading dims, then ones.
inline std::vector<int64_t> layer_norm_stat_shape(const Tensor& input, int64_t nd) {
  std::vector<int64_t> s(input.sizes().begin(), input.sizes().end());
  for (int64_t i = input.dim() - nd; i < input.dim(); ++i) s[i] = 1;
  return s;
}

// A weight or bias gradient, value() computed only when wanted: the
// parameter's dtype (the input's when it is absent), 0 elements when not
// wanted.
template <class F>
Tensor param_grad(const Tensor& input, bool wanted, const OptTensor& param, F&& value) {
  const auto dt = present(param) ? param->scalar_type() : input.scalar_type();
  return wanted ? value().to(dt) : at::empty({0}, input.options().dtype(dt));
}

// Layer norm's weight (which = 0) or bias (1) gradient from per-chunk partials
// [2, chunks, D]: the parameter's dtype (the input's when it is absent), and
// 0 elements when not wanted.
inline Tensor layer_norm_param_grad(const Tensor& input, const Tensor& partial, int64_t which,
                                    bool wanted, const OptTensor& param, at::IntArrayRef shape) {
  const auto dt = present(param) ? param->scalar_type() : input.scalar_type();
  if (!wanted) return at::empty({0}, input.options().dtype(dt));
  return partial[which].sum(0).view(shape).to(dt);
}

}  // namespace normops
