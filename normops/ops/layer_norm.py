"""Registrations of the layer-norm ops: fake kernels and autograd."""
import torch
import torch.nn.functional as F

from ._layout import acc_dtype, check_devices, empty_param_grad, needs_double_backward

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
    input, weight, bias, mean, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if needs_double_backward(grad_out, input, weight, bias):
        wanted = [t for t, n in zip((input, None, weight, bias), needs) if n]
        with torch.enable_grad():
            y = F.layer_norm(input, ctx.normalized_shape, weight, bias, ctx.eps)
            found = iter(torch.autograd.grad(y, wanted, grad_out, create_graph=True))
        gi, gw, gb = (next(found) if needs[i] else None for i in (0, 2, 3))
    else:
        gi, gw, gb = ops.layer_norm_backward(
            grad_out, input, ctx.normalized_shape, mean, rstd, weight, bias,
            [needs[0], needs[2], needs[3]])
        gi, gw, gb = (g if needs[i] else None for g, i in zip((gi, gw, gb), (0, 2, 3)))
    return gi, None, gw, gb, None


torch.library.register_autograd("normops::layer_norm", _backward, setup_context=_setup_context)
