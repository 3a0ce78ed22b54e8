"""Registrations of the depthwise 3x3 convolution ops (padding 1, no bias,
CPU): fake kernels and autograd. The backward is the backward op, or torch's
convolution when the backward itself is differentiated."""
import torch
import torch.nn.functional as F

from ._common import check_devices, needs_double_backward, register_autograd, torch_grads

ops = torch.ops.normops
_OP = "normops.depthwise_conv3x3"


def reference(input, weight, stride):
    """The op's semantics in torch ops."""
    return F.conv2d(input, weight, None, stride, 1, 1, weight.size(0))


def _check(input, weight, stride):
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


def _out_shape(input, stride):
    N, C, H, W = input.shape
    return (N, C, (H - 1) // stride + 1, (W - 1) // stride + 1)


def _empty_like_layout(input, shape):
    channels_last = (not input.is_contiguous()
                     and input.is_contiguous(memory_format=torch.channels_last))
    return input.new_empty(shape).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@torch.library.register_fake("normops::depthwise_conv3x3")
def _(input, weight, stride):
    _check(input, weight, stride)
    return _empty_like_layout(input, _out_shape(input, stride))


@torch.library.register_fake("normops::depthwise_conv3x3_backward")
def _(grad_out, input, weight, stride, output_mask):
    _check(input, weight, stride)
    check_devices(_OP, input, grad_output=grad_out)
    shape = _out_shape(input, stride)
    torch._check(tuple(grad_out.shape) == shape and grad_out.dtype == input.dtype,
                 lambda: f"{_OP}: expected grad_output of shape {list(shape)} and dtype "
                 f"{input.dtype}, but got {list(grad_out.shape)} and {grad_out.dtype}")
    grad_input = _empty_like_layout(input, input.shape) if output_mask[0] else input.new_empty(0)
    grad_weight = weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0)
    return grad_input, grad_weight


def _setup_context(ctx, inputs, output):
    input, weight, stride = inputs
    ctx.save_for_backward(input, weight)
    ctx.stride = stride


def _backward(ctx, grad_out):
    input, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad[:2]
    if needs_double_backward(grad_out, input, weight):
        grads = torch_grads(lambda x, w: reference(x, w, ctx.stride), (input, weight), needs,
                            grad_out)
        return (*grads, None)
    grad_input, grad_weight = ops.depthwise_conv3x3_backward(grad_out, input, weight,
                                                            ctx.stride, list(needs))
    return (grad_input if needs[0] else None, grad_weight if needs[1] else None, None)


register_autograd(ops.depthwise_conv3x3, _backward, _setup_context)
