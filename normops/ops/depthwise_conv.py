"""Registrations of the depthwise 3x3 convolution ops (padding 1, no bias,
CPU): fake kernels and autograd. The backward is the backward op, or torch's
ops when the backward itself is differentiated or an input norm is
differentiated (its gradient flows through the batch statistics, which the
caller, the inverted residual's recomputing backward, handles itself)."""
import torch
import torch.nn.functional as F

from ._common import (channels_last_output, check_devices, needs_double_backward,
                      register_autograd, torch_grads)
from .batch_norm import apply_activation

ops = torch.ops.normops
_OP = "normops.depthwise_conv3x3"


def reference(input, weight, stride, norm_mean=None, norm_var=None, norm_weight=None,
              norm_bias=None, norm_eps=0.0, norm_activation=0):
    """The op's semantics in torch ops."""
    if norm_mean is not None:
        # Written out: F.batch_norm has no gradient for its statistics.
        def per_channel(t):
            return t.to(input.dtype)[:, None, None]

        input = (input - per_channel(norm_mean)) * torch.rsqrt(per_channel(norm_var) + norm_eps)
        if norm_weight is not None:
            input = input * per_channel(norm_weight)
        if norm_bias is not None:
            input = input + per_channel(norm_bias)
        input = apply_activation(input, norm_activation)
    return F.conv2d(input, weight, None, stride, 1, 1, weight.size(0))


def _check(input, weight, stride, norm, norm_activation):
    check_devices(_OP, input, weight=weight)
    torch._check(input.dim() == 4, lambda: f"{_OP}: expected a 4-D (N, C, H, W) input, but "
                 f"got {input.dim()}-D")
    torch._check(input.size(1) > 0 and input.size(2) > 0 and input.size(3) > 0,
                 lambda: f"{_OP}: expected non-empty channel and spatial dims, but got input "
                 f"of size {list(input.shape)}")
    torch._check(input.dtype in (torch.float32, torch.float64),
                 lambda: f"{_OP}: expected a float32 or float64 input, but got {input.dtype}")
    torch._check(weight.shape == (input.size(1), 1, 3, 3) and weight.dtype == input.dtype,
                 lambda: f"{_OP}: expected weight of shape [{input.size(1)}, 1, 3, 3] and dtype "
                 f"{input.dtype}, but got {list(weight.shape)} and {weight.dtype}")
    torch._check(stride in (1, 2), lambda: f"{_OP}: stride must be 1 or 2, but got {stride}")
    torch._check(norm_activation in (0, 1, 2),
                 lambda: "normops: activation must be 0 (none), 1 (relu) or 2 (relu6), but got "
                 f"{norm_activation}")
    mean, var, norm_weight, norm_bias = norm
    torch._check((mean is None) == (var is None),
                 lambda: f"{_OP}: expected both norm_mean and norm_var, or neither")
    torch._check(mean is not None or (norm_weight is None and norm_bias is None),
                 lambda: f"{_OP}: norm_weight and norm_bias need norm_mean and norm_var")
    check_devices(_OP, input, norm_mean=mean, norm_var=var, norm_weight=norm_weight,
                  norm_bias=norm_bias)
    C = input.size(1)
    for name, t in (("norm_mean", mean), ("norm_var", var)):
        torch._check(t is None or (t.shape == (C,) and t.is_floating_point()),
                     lambda: f"{_OP}: expected {name} to be a floating point vector of {C} "
                     f"values, but got {t.dtype} of shape {list(t.shape)}")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        torch._check(t is None or (t.shape == (C,) and t.dtype == input.dtype),
                     lambda: f"{_OP}: expected {name} of shape [{C}] and dtype {input.dtype}, "
                     f"but got {list(t.shape)} and {t.dtype}")


def _out_shape(input, stride):
    N, C, H, W = input.shape
    return (N, C, (H - 1) // stride + 1, (W - 1) // stride + 1)


def _empty_like_layout(input, shape):
    return input.new_empty(shape).contiguous(
        memory_format=torch.channels_last if channels_last_output(input)
        else torch.contiguous_format)


@torch.library.register_fake("normops::depthwise_conv3x3")
def _(input, weight, stride, norm_mean=None, norm_var=None, norm_weight=None, norm_bias=None,
      norm_eps=0.0, norm_activation=0):
    _check(input, weight, stride, (norm_mean, norm_var, norm_weight, norm_bias), norm_activation)
    return _empty_like_layout(input, _out_shape(input, stride))


@torch.library.register_fake("normops::depthwise_conv3x3_backward")
def _(grad_out, input, weight, stride, output_mask, norm_mean=None, norm_var=None,
      norm_weight=None, norm_bias=None, norm_eps=0.0, norm_activation=0):
    _check(input, weight, stride, (norm_mean, norm_var, norm_weight, norm_bias), norm_activation)
    check_devices(_OP, input, grad_output=grad_out)
    shape = _out_shape(input, stride)
    torch._check(tuple(grad_out.shape) == shape and grad_out.dtype == input.dtype,
                 lambda: f"{_OP}: expected grad_output of shape {list(shape)} and dtype "
                 f"{input.dtype}, but got {list(grad_out.shape)} and {grad_out.dtype}")
    grad_input = _empty_like_layout(input, input.shape) if output_mask[0] else input.new_empty(0)
    grad_weight = weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0)
    return grad_input, grad_weight


_NORM_DEFAULTS = (None, None, None, None, 0.0, 0)


def _setup_context(ctx, inputs, output):
    input, weight, stride = inputs[:3]
    norm = (*inputs[3:], *_NORM_DEFAULTS[len(inputs) - 3:])  # eager calls may omit defaults
    ctx.save_for_backward(input, weight, *norm[:4])
    ctx.stride, ctx.norm_eps, ctx.norm_activation = stride, *norm[4:]


def _backward(ctx, grad_out):
    input, weight, *norm = ctx.saved_tensors
    given = (*ctx.needs_input_grad, *(False,) * 9)
    needs = given[:2] + given[3:7]
    if norm[0] is not None or needs_double_backward(grad_out, input, weight):
        tensors = (input, weight, *norm)
        grads = torch_grads(
            lambda x, w, *n: reference(x, w, ctx.stride, *n, ctx.norm_eps, ctx.norm_activation),
            tensors, [need and t is not None for need, t in zip(needs, tensors)], grad_out,
            create_graph=torch.is_grad_enabled())
        return (*grads[:2], None, *grads[2:], None, None)
    grad_input, grad_weight = ops.depthwise_conv3x3_backward(grad_out, input, weight,
                                                            ctx.stride, list(needs[:2]))
    return (grad_input if needs[0] else None, grad_weight if needs[1] else None,
            None, None, None, None, None, None, None)


register_autograd(ops.depthwise_conv3x3, _backward, _setup_context)
