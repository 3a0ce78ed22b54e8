"""Registrations of the group-norm ops (instance norm included): fake kernels
and autograd."""
import torch
import torch.nn.functional as F

from ._common import (affine_norm_backward, check_devices, empty_like_channels,
                      empty_param_grad, empty_stats, register_autograd)

ops = torch.ops.normops


@torch.library.register_fake("normops::group_norm")
def _(input, num_groups, weight, bias, eps):
    check_devices("normops.group_norm", input, weight=weight, bias=bias)
    N = input.size(0)
    return (empty_like_channels(input), empty_stats(input, N, num_groups),
            empty_stats(input, N, num_groups))


@torch.library.register_fake("normops::group_norm_backward")
def _(grad_out, input, num_groups, mean, rstd, weight, output_mask):
    check_devices("normops.group_norm_backward", input, grad_output=grad_out, mean=mean,
                  rstd=rstd, weight=weight)
    C = input.size(1)
    grad_input = empty_like_channels(input) if output_mask[0] else input.new_empty((0,))
    return (grad_input, empty_param_grad(input, weight, output_mask[1], (C,)),
            empty_param_grad(input, weight, output_mask[2], (C,)))


def _setup_context(ctx, inputs, output):
    input, num_groups, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, weight, bias, mean, rstd)
    ctx.num_groups, ctx.eps = num_groups, eps
    ctx.mark_non_differentiable(mean, rstd)


def _reference(x, groups, weight, bias, eps):
    """F.group_norm, differentiable twice. A bias without a weight is added
    after it: torch's group norm refuses that pair (it reshapes the absent
    weight), which instance norm, a batch norm in torch, accepts."""
    if weight is None and bias is not None:
        y = F.group_norm(x, groups, None, None, eps)
        return y + bias.view([1, -1] + [1] * (x.dim() - 2))
    return F.group_norm(x, groups, weight, bias, eps)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    return affine_norm_backward(
        ctx, grad_out,
        lambda x, w, b: _reference(x, ctx.num_groups, w, b, ctx.eps),
        lambda g, x, mean, rstd, w, b, needs: ops.group_norm_backward(
            g, x, ctx.num_groups, mean, rstd, w, needs))


register_autograd(ops.group_norm, _backward, _setup_context)

# torch's autocast policy for group_norm: CUDA casts the inputs to float32 (float32
# out); CPU autocast leaves it alone. Instance norm,
# which torch runs as a batch norm in the input dtype, opts out in
# functional.instance_norm.
torch.library.register_autocast("normops::group_norm", "cuda", torch.float32)
