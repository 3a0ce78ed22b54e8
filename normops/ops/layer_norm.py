"""Registrations of the layer-norm ops: fake kernels and autograd."""
import torch
import torch.nn.functional as F

from ._common import (acc_dtype, affine_norm_backward, check_devices, empty_param_grad,
                      register_autograd)

ops = torch.ops.normops


@torch.library.register_fake("normops::layer_norm")
def _(input, normalized_shape, weight, bias, eps):
    check_devices("normops.layer_norm", input, weight=weight, bias=bias)
    nd = len(normalized_shape)
    stat_shape = list(input.shape[: input.dim() - nd]) + [1] * nd
    out = input.new_empty(input.shape)
    dtype = acc_dtype(input.dtype)
    return out, input.new_empty(stat_shape, dtype=dtype), input.new_empty(stat_shape, dtype=dtype)


@torch.library.register_fake("normops::layer_norm_backward")
def _(grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask):
    check_devices("normops.layer_norm_backward", input, grad_output=grad_out, mean=mean,
                  rstd=rstd, weight=weight, bias=bias)
    grad_input = input.new_empty(input.shape) if output_mask[0] else input.new_empty((0,))
    shape = tuple(normalized_shape)
    return (grad_input, empty_param_grad(input, weight, output_mask[1], shape),
            empty_param_grad(input, bias, output_mask[2], shape))


def _setup_context(ctx, inputs, output):
    input, normalized_shape, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, weight, bias, mean, rstd)
    ctx.normalized_shape, ctx.eps = normalized_shape, eps
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    return affine_norm_backward(
        ctx, grad_out,
        lambda x, w, b: F.layer_norm(x, ctx.normalized_shape, w, b, ctx.eps),
        lambda g, x, mean, rstd, w, b, needs: ops.layer_norm_backward(
            g, x, ctx.normalized_shape, mean, rstd, w, b, needs))


register_autograd(ops.layer_norm, _backward, _setup_context)

# torch's autocast policy for layer_norm: CUDA casts the inputs to float32 (float32
# out); CPU autocast leaves it alone.
torch.library.register_autocast("normops::layer_norm", "cuda", torch.float32)
