// Every normops op schema, in one place. Kernels are attached per backend in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels, autograd and autocast rules
// are registered in Python (normops/ops/).
//
// Statistics outputs are in the accumulation dtype (float32 for half, bfloat16
// and float32 inputs; float64 for float64). Unrequested gradients come back as
// 0-element tensors. `activation` is 0 (none), 1 (ReLU) or 2 (ReLU6).
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include "cpu/common.h"
#include "cpu/kernels/kernels.h"

TORCH_LIBRARY(normops, m) {
  // Batch norm, in the steps SyncBatchNorm composes: local statistics
  // (mean, biased var) -> [collective] -> elementwise; backward sums
  // (sum dy, sum dy*(x-mean)) -> [collective] -> elementwise.
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def(
      "batch_norm_elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, "
      "float eps, int activation=0) -> Tensor");
  m.def(
      "batch_norm_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor var, "
      "Tensor? weight, Tensor? bias, float eps, int activation=0) -> (Tensor sum_dy, Tensor "
      "sum_dy_xmu)");
  m.def(
      "batch_norm_backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor var, "
      "Tensor? weight, Tensor? bias, Tensor mean_dy, Tensor mean_dy_xmu, float eps, "
      "int activation=0) -> Tensor");
  // Single-call forward: batch statistics when training (returned for the
  // running-stat update), else the running ones (then mean and var are empty).
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps, int activation=0) -> (Tensor out, "
      "Tensor mean, Tensor var)");
  // running = (1 - momentum) * running + momentum * batch statistic (the
  // variance made unbiased with `count` values per channel), in place.
  m.def(
      "update_running_stats(Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor mean, "
      "Tensor var, float momentum, int count) -> ()");
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor var, bool training, float eps, int activation, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  m.def(
      "layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_backward(Tensor grad_out, Tensor input, SymInt[] normalized_shape, "
      "Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, bool[3] output_mask) -> "
      "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // Group norm; instance norm is group norm with num_groups == channels.
  m.def(
      "group_norm(Tensor input, int num_groups, Tensor? weight, Tensor? bias, float eps) -> "
      "(Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "group_norm_backward(Tensor grad_out, Tensor input, int num_groups, Tensor mean, "
      "Tensor rstd, Tensor? weight, bool[3] output_mask) -> (Tensor grad_input, "
      "Tensor grad_weight, Tensor grad_bias)");

  // Depthwise 3x3 convolution, padding 1, no bias (weight [C, 1, 3, 3],
  // stride 1 or 2), for the inverted residual's training path (CPU). With
  // norm_mean and norm_var it convolves act(batch_norm(input)) (the layer
  // before, as batch_norm_elemt computes it) without storing it; the
  // backward's grad_input is then the gradient at that normalised input.
  m.def(
      "depthwise_conv3x3(Tensor input, Tensor weight, int stride, Tensor? norm_mean=None, "
      "Tensor? norm_var=None, Tensor? norm_weight=None, Tensor? norm_bias=None, "
      "float norm_eps=0., int norm_activation=0) -> Tensor");
  m.def(
      "depthwise_conv3x3_backward(Tensor grad_out, Tensor input, Tensor weight, int stride, "
      "bool[2] output_mask, Tensor? norm_mean=None, Tensor? norm_var=None, "
      "Tensor? norm_weight=None, Tensor? norm_bias=None, float norm_eps=0., "
      "int norm_activation=0) -> (Tensor grad_input, Tensor grad_weight)");

  // MobileNetV2's inverted residual in inference, batch norms folded into the
  // convolutions (see csrc/inverted_residual.h): expand 1x1 + ReLU6 (absent
  // for expansion 1), depthwise 3x3 + ReLU6, project 1x1, + input.
  m.def(
      "inverted_residual(Tensor input, Tensor? expand_weight, Tensor? expand_bias, "
      "Tensor depthwise_weight, Tensor depthwise_bias, Tensor project_weight, "
      "Tensor project_bias, int stride, bool residual) -> Tensor");
}

// A plain extension module: importing it runs the registrations above. Its
// functions report which CPU kernel build is in use and compare weights for
// the Python caches of values derived from them.
namespace {
PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(normops::cpu::cpu_capability_name());
}

PyObject* same_contents(PyObject*, PyObject* args) {
  PyObject *a = nullptr, *b = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &a, &b)) return nullptr;
  PyObject* la = PySequence_Fast(a, "same_contents: expected two sequences of tensors");
  if (la == nullptr) return nullptr;
  PyObject* lb = PySequence_Fast(b, "same_contents: expected two sequences of tensors");
  if (lb == nullptr) {
    Py_DECREF(la);
    return nullptr;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(la);
  bool same = n == PySequence_Fast_GET_SIZE(lb);
  for (Py_ssize_t i = 0; same && i < n; ++i) {
    PyObject* ta = PySequence_Fast_GET_ITEM(la, i);
    PyObject* tb = PySequence_Fast_GET_ITEM(lb, i);
    if (!THPVariable_Check(ta) || !THPVariable_Check(tb)) {
      Py_DECREF(la);
      Py_DECREF(lb);
      PyErr_SetString(PyExc_TypeError, "same_contents: expected two sequences of tensors");
      return nullptr;
    }
    // Other devices count as different: that only costs the caller a recomputation.
    same = normops::cpu::same_values(THPVariable_Unpack(ta), THPVariable_Unpack(tb));
  }
  Py_DECREF(la);
  Py_DECREF(lb);
  return PyBool_FromLong(same);
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU kernel build in use: 'default', 'avx2' or 'avx512'."},
    {"same_contents", same_contents, METH_VARARGS,
     "same_contents(a, b): whether the tensors of a hold the values of those of b (CPU, same "
     "dtype and shape)."},
    {nullptr, nullptr, 0, nullptr}};
PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
