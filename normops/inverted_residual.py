"""MobileNetV2's inverted residual block, fused.

The module has torchvision's layout, attributes and state_dict keys; only
its forward differs:

- eval: the three batch norms are folded into the convolutions (cached,
  refolded when a parameter or running statistic changes) and the whole block
  runs as one op, normops::inverted_residual, which never materialises the
  expanded tensor;
- training, memory_efficient=True (default): the forward runs without
  recording a graph and keeps only the block input and the parameters; the
  backward recomputes the block (with the batch statistics of the forward's
  batch) and differentiates it. memory_efficient=False records the graph as
  the unfused block does (more memory, no recomputation), and so does
  torch.compile, which cannot trace the recomputing backward.

Any other configuration (a norm layer that is not a BatchNorm2d, a changed
sub-module, eval without running statistics, a device without the kernel)
runs the unfused submodules, exactly as torchvision's block does.
"""
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import batch_norm as _batch_norm

ops = torch.ops.normops

_RELU6 = 2


def _conv_norm_act(inp: int, oup: int, kernel: int, stride: int, groups: int,
                   norm_layer: Callable[..., nn.Module]) -> nn.Sequential:
    """torchvision's Conv2dNormActivation(..., activation_layer=ReLU6): same
    children and state_dict keys."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        norm_layer(oup), nn.ReLU6(inplace=True))


def _is_bn(m) -> bool:
    return isinstance(m, nn.BatchNorm2d) and getattr(m, "activation", None) is None


def _is_conv(m, kernel, stride, groups) -> bool:
    return (type(m) is nn.Conv2d and m.bias is None and m.kernel_size == (kernel, kernel)
            and m.stride == (stride, stride) and m.padding == ((kernel - 1) // 2,) * 2
            and m.dilation == (1, 1) and m.groups == groups and m.padding_mode == "zeros")


def _is_conv_bn_relu6(seq, kernel, stride, groups) -> bool:
    return (isinstance(seq, nn.Sequential) and len(seq) == 3
            and _is_conv(seq[0], kernel, stride, groups) and _is_bn(seq[1])
            and type(seq[2]) is nn.ReLU6)


def block_stages(conv: nn.Sequential):
    """The (conv, bn) pairs of a torchvision inverted residual's `conv`
    Sequential, expansion first (None for expand_ratio 1), and the stride;
    None when `conv` does not have exactly that structure."""
    if not isinstance(conv, nn.Sequential) or len(conv) not in (3, 4):
        return None
    expand = conv[0] if len(conv) == 4 else None
    dw, project, project_bn = conv[len(conv) - 3], conv[len(conv) - 2], conv[len(conv) - 1]
    if not (isinstance(dw, nn.Sequential) and len(dw) == 3 and isinstance(dw[0], nn.Conv2d)):
        return None
    hidden, stride = dw[0].out_channels, dw[0].stride[0]
    if stride not in (1, 2) or not _is_conv_bn_relu6(dw, 3, stride, hidden):
        return None
    if expand is not None and not _is_conv_bn_relu6(expand, 1, 1, 1):
        return None
    if not (_is_conv(project, 1, 1, 1) and _is_bn(project_bn)):
        return None
    stages = [None if expand is None else (expand[0], expand[1]), (dw[0], dw[1]),
              (project, project_bn)]
    return stages, stride


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """The conv weight (flattened) and bias with the eval batch norm folded in."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    w = conv.weight * scale.to(conv.weight.dtype)[:, None, None, None]
    w = w.flatten(1) if conv.kernel_size == (1, 1) else w.flatten(0, 1)
    return w, bias.to(conv.weight.dtype)


def _momentum(bn: nn.BatchNorm2d) -> float:
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked + 1)
    return bn.momentum


def _stage_params(stages) -> List[Optional[Tensor]]:
    """conv weight, bn weight, bn bias of each stage (Nones for a missing
    expansion or a non-affine batch norm)."""
    out = []
    for pair in stages:
        conv, bn = pair if pair is not None else (None, None)
        out += [None, None, None] if conv is None else [conv.weight, bn.weight, bn.bias]
    return out


def _train_block(x: Tensor, params, stages, stride: int, residual: bool, update: bool) -> Tensor:
    """The block in training mode on torch convolutions and normops batch
    norms (ReLU6 fused into the first two), with the given parameter tensors
    (those of `stages`' modules, or their saved copies). The running
    statistics of the modules move only when `update`."""

    def bn(h, weight, bias, module, activation):
        track = update and module.track_running_stats and module.running_mean is not None
        out = _batch_norm(h, module.running_mean if track else None,
                          module.running_var if track else None, weight, bias, True,
                          _momentum(module) if track else 0.0, module.eps, activation=activation)
        if track and module.num_batches_tracked is not None:
            module.num_batches_tracked.add_(1)
        return out

    ew, ebw, ebb, dw, dbw, dbb, pw, pbw, pbb = params
    h = x
    if ew is not None:
        h = bn(F.conv2d(h, ew), ebw, ebb, stages[0][1], "relu6")
    h = bn(F.conv2d(h, dw, None, stride, 1, groups=dw.size(0)), dbw, dbb, stages[1][1], "relu6")
    y = bn(F.conv2d(h, pw), pbw, pbb, stages[2][1], None)
    return y + x if residual else y


class _RecomputedTrainBlock(torch.autograd.Function):
    """Training forward without a graph, saving only the input and the
    parameters; the backward recomputes the block from them (the same batch,
    hence the same batch statistics) and differentiates it."""

    @staticmethod
    def forward(ctx, stages, stride, residual, x, *params):
        ctx.stages, ctx.stride, ctx.residual = stages, stride, residual
        ctx.save_for_backward(x, *params)
        return _train_block(x, params, stages, stride, residual, update=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        needs = ctx.needs_input_grad[3:]
        # Fresh leaves: saved-tensor hooks may hand back other objects.
        inputs = [None if t is None else t.detach().requires_grad_(n)
                  for t, n in zip(ctx.saved_tensors, needs)]
        wanted = [t for t, n in zip(inputs, needs) if n]
        with torch.enable_grad():
            y = _train_block(inputs[0], inputs[1:], ctx.stages, ctx.stride, ctx.residual,
                             update=False)
            found = iter(torch.autograd.grad(y, wanted, grad_out))
        return (None, None, None, *[next(found) if n else None for n in needs])


class InvertedResidual(nn.Module):
    """torchvision.models.mobilenetv2.InvertedResidual, fused (see the module
    docstring). `memory_efficient` chooses how training saves for backward."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int,
                 norm_layer: Optional[Callable[..., nn.Module]] = None,
                 memory_efficient: bool = True) -> None:
        super().__init__()
        self.stride = stride
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_norm_act(inp, hidden_dim, 1, 1, 1, norm_layer))
        layers += [_conv_norm_act(hidden_dim, hidden_dim, 3, stride, hidden_dim, norm_layer),
                   nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), norm_layer(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1
        self.memory_efficient = memory_efficient

    def extra_repr(self) -> str:
        return f"memory_efficient={self.memory_efficient}"

    def _folded(self, stages) -> List[Optional[Tensor]]:
        """Folded weights and biases, cached while no parameter or running
        statistic changes (tensor versions), unless they carry a graph."""
        tensors = [t for pair in stages if pair is not None for m in pair
                   for t in (m.weight, getattr(m, "bias", None), getattr(m, "running_mean", None),
                             getattr(m, "running_var", None)) if t is not None]
        differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        cacheable = not differentiable and not torch.compiler.is_compiling()
        key = (tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
               if cacheable else None)
        cached = getattr(self, "_fold_cache", None)
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        folded = []
        for pair in stages:
            folded += [None, None] if pair is None else list(_fold(*pair))
        if key is not None:
            self._fold_cache = (key, folded)
        return folded

    def forward(self, x: Tensor) -> Tensor:
        found = block_stages(self.conv)
        fusable = found is not None and x.dim() == 4 and x.device.type == "cpu"
        if fusable:
            stages, stride = found
            if self.training:
                params = _stage_params(stages)
                # Dynamo cannot trace the recomputing backward (autograd.grad):
                # compiled, the graph is recorded and AOTAutograd's partitioner
                # chooses what to save.
                if self.memory_efficient and not torch.compiler.is_compiling():
                    return _RecomputedTrainBlock.apply(stages, stride, self.use_res_connect, x,
                                                       *params)
                return _train_block(x, params, stages, stride, self.use_res_connect,
                                    update=True)
            if all(bn.running_mean is not None for _, bn in filter(None, stages)):
                return ops.inverted_residual(x, *self._folded(stages), stride,
                                             self.use_res_connect)
        y = self.conv(x)
        return x + y if self.use_res_connect else y
