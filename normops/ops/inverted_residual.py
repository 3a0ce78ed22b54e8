"""Registrations of the inference inverted-residual op: fake kernel and
autograd. The backward recomputes the block through torch's differentiable
convolutions from the saved input and folded weights (no activation is
kept), so it also serves double backward."""
import torch
import torch.nn.functional as F

from ._common import (acc_dtype, channels_last_output, check_devices, register_autograd,
                      torch_grads)

ops = torch.ops.normops


def reference(input, expand_weight, expand_bias, depthwise_weight, depthwise_bias,
              project_weight, project_bias, stride, residual):
    """The op's semantics in torch ops (BN already folded into the convs)."""
    h = input
    if expand_weight is not None:
        h = F.relu6(F.conv2d(h, expand_weight[:, :, None, None], expand_bias))
    h = F.relu6(F.conv2d(h, depthwise_weight[:, None], depthwise_bias, stride, 1,
                         groups=depthwise_weight.size(0)))
    y = F.conv2d(h, project_weight[:, :, None, None], project_bias)
    return y + input if residual else y


@torch.library.register_fake("normops::inverted_residual")
def _(input, expand_weight, expand_bias, depthwise_weight, depthwise_bias, project_weight,
      project_bias, stride, residual):
    check_devices("normops.inverted_residual", input, expand_weight=expand_weight,
                  expand_bias=expand_bias, depthwise_weight=depthwise_weight,
                  depthwise_bias=depthwise_bias, project_weight=project_weight,
                  project_bias=project_bias)
    torch._check(input.dim() == 4, lambda: "normops.inverted_residual: expected a 4-D input")
    N, _, H, W = input.shape
    shape = (N, project_weight.size(0), (H - 1) // stride + 1, (W - 1) // stride + 1)
    return torch.empty(shape, dtype=input.dtype, device=input.device,
                       memory_format=torch.channels_last if channels_last_output(input)
                       else torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    *tensors, stride, residual = inputs
    ctx.save_for_backward(*tensors)
    ctx.stride, ctx.residual = stride, residual


def _backward(ctx, grad_out):
    tensors = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:7])
    # A graph through the recomputation only when the backward is itself
    # differentiated (create_graph=True).
    # In the kernel's dtype: a bfloat16/float16 input may come with float32
    # weights, which torch's convolutions do not mix.
    acc = acc_dtype(tensors[0].dtype)

    def recompute(*t):
        return reference(*(None if v is None else v.to(acc) for v in t), ctx.stride,
                         ctx.residual)
    create_graph = torch.is_grad_enabled()
    if not create_graph:
        # Differentiated from the saved values alone: their own history (the
        # fold's graph, which a trace's executor may have freed already) is
        # the engine's to follow, not this recomputation's.
        tensors = [None if t is None else t.detach().requires_grad_(n)
                   for t, n in zip(tensors, needs)]
    grads = torch_grads(recompute, tensors, needs, grad_out.to(acc), create_graph=create_graph)
    return (*grads, None, None)


register_autograd(ops.inverted_residual, _backward, _setup_context)
