"""Registrations of the batch-norm ops: fake kernels and autograd."""
import torch
import torch.nn.functional as F

from ._common import (check_devices, empty_like_channels, empty_param_grad, empty_stats,
                      needs_double_backward, register_autograd, torch_grads)

ops = torch.ops.normops

ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2}


def apply_activation(y, activation: int):
    if activation == 1:
        return F.relu(y)
    if activation == 2:
        return F.relu6(y)
    return y


@torch.library.register_fake("normops::batch_norm_stats")
def _(input):
    C = input.size(1)
    return empty_stats(input, C), empty_stats(input, C)


@torch.library.register_fake("normops::batch_norm_elemt")
def _(input, weight, bias, mean, var, eps, activation=0):
    check_devices("normops.batch_norm", input, weight=weight, bias=bias, mean=mean, var=var)
    return empty_like_channels(input)


@torch.library.register_fake("normops::batch_norm_backward_reduce")
def _(grad_out, input, mean, var, weight, bias, eps, activation=0):
    C = input.size(1)
    return empty_stats(input, C), empty_stats(input, C)


@torch.library.register_fake("normops::batch_norm_backward_elemt")
def _(grad_out, input, mean, var, weight, bias, mean_dy, mean_dy_xmu, eps, activation=0):
    return empty_like_channels(input)


@torch.library.register_fake("normops::batch_norm")
def _(input, weight, bias, running_mean, running_var, training, eps, activation=0):
    check_devices("normops.batch_norm", input, weight=weight, bias=bias,
                  running_mean=running_mean, running_var=running_var)
    n = input.size(1) if training else 0
    return empty_like_channels(input), empty_stats(input, n), empty_stats(input, n)


@torch.library.register_fake("normops::update_running_stats")
def _(running_mean, running_var, mean, var, momentum, count):
    check_devices("normops.batch_norm", mean, var=var, running_mean=running_mean,
                  running_var=running_var)


@torch.library.register_fake("normops::batch_norm_backward")
def _(grad_out, input, weight, bias, mean, var, training, eps, activation, output_mask):
    C = input.size(1)
    grad_input = empty_like_channels(input) if output_mask[0] else input.new_empty((0,))
    return (grad_input, empty_param_grad(input, weight, output_mask[1], (C,)),
            empty_param_grad(input, bias, output_mask[2], (C,)))


def _setup_context(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, training, eps, activation = inputs
    _, mean, var = output
    if not training:
        # Copies (C values each): the buffers themselves may be updated in
        # place by a later training step before this graph's backward runs.
        mean, var = running_mean.detach().clone(), running_var.detach().clone()
    ctx.save_for_backward(input, weight, bias, mean, var)
    ctx.training, ctx.eps, ctx.activation = training, eps, activation
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    input, weight, bias, mean, var = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    if needs_double_backward(grad_out, input, weight, bias):
        def forward(x, w, b):
            if ctx.training:
                y = F.batch_norm(x, None, None, w, b, True, 0.0, ctx.eps)
            else:
                y = F.batch_norm(x, mean, var, w, b, False, 0.0, ctx.eps)
            return apply_activation(y, ctx.activation)
        gi, gw, gb = torch_grads(forward, (input, weight, bias), needs, grad_out)
    else:
        grads = ops.batch_norm_backward(
            grad_out, input, weight, bias, mean, var, ctx.training, ctx.eps,
            ctx.activation, needs)
        gi, gw, gb = (g if n else None for g, n in zip(grads, needs))
    return gi, gw, gb, None, None, None, None, None


register_autograd(ops.batch_norm, _backward, _setup_context)
