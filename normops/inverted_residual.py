"""MobileNetV2's inverted residual block, fused.

The module has torchvision's layout, attributes and state_dict keys; only
its forward differs:

- eval: the three batch norms are folded into the convolutions (cached,
  refolded when a parameter or running statistic changes) and the whole block
  runs as one op, normops::inverted_residual, which never materialises the
  expanded tensor;
- training, memory_efficient=True (default): the forward runs without
  recording a graph and keeps only bottleneck-sized tensors (the block input
  and the projection's output) and the batch statistics; the backward
  recomputes the expanded activations with those statistics and runs the
  convolution and batch-norm backward ops. memory_efficient=False records the graph as
  the unfused block does (more memory, no recomputation), and so does
  torch.compile, which cannot trace the recomputing backward.

Training runs where normops' batch-norm ops have kernels (CPU, and CUDA in a
CUDA build, there with torch's convolutions throughout); the fused eval op
is CPU only. Any other configuration (a norm layer that is not a
BatchNorm2d, a changed sub-module, hooks on a sub-module (pruning, weight
norm, observers), eval without running statistics, a device without the
kernel, autocast, an input of another dtype than the weights, torch.func
transforms and forward-mode AD) runs the unfused submodules, exactly as
torchvision's block does.
"""
import contextlib
import functools
from typing import Callable, List, Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from ._C import same_contents
from ._fx import fx_leaf, refuse_script
from .functional import needs_torch_rules, update_running_stats
from .ops._common import (below_autograd, call, channels_last_output, needs_double_backward,
                          torch_grads)

ops = torch.ops.normops

_RELU6 = 2


class Conv2dNormActivation(nn.Sequential):
    """torchvision's Conv2dNormActivation as MobileNetV2 builds it (padded
    convolution without bias, norm layer, ReLU6): same children, state_dict
    keys and `out_channels`, which detection backbones read."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 groups: int, norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                      groups=groups, bias=False),
            norm_layer(out_channels), nn.ReLU6(inplace=True))
        self.out_channels = out_channels


def _is_bn(m) -> bool:
    """torch's or normops' BatchNorm2d itself: a subclass may have its own
    forward, which the fused paths would skip."""
    return type(m) is nn.BatchNorm2d or type(m) is _normops_batch_norm()


@functools.lru_cache(maxsize=None)
def _normops_batch_norm() -> type:
    from .nn import BatchNorm2d  # normops.nn imports this module
    return BatchNorm2d


def _is_conv(m, kernel, stride, groups) -> bool:
    # _parameters, not m.bias: nn.Module.__getattr__ is slow, and this runs
    # on every forward.
    return (type(m) is nn.Conv2d and m._parameters.get("bias") is None
            and m.kernel_size == (kernel, kernel)
            and m.stride == (stride, stride) and m.padding == ((kernel - 1) // 2,) * 2
            and m.dilation == (1, 1) and m.groups == groups and m.padding_mode == "zeros")


def _children(seq) -> Optional[list]:
    """The children in order of a Sequential that runs them in order (a
    subclass with Sequential's forward, as torchvision's Conv2dNormActivation;
    read from _modules: indexing walks a Sequential each time, and this runs on
    every forward); None for anything else."""
    if not (isinstance(seq, nn.Sequential) and type(seq).forward is nn.Sequential.forward):
        return None
    return list(seq._modules.values())


def _is_conv_bn_relu6(seq, kernel, stride, groups) -> bool:
    layers = _children(seq)
    return (layers is not None and len(layers) == 3
            and _is_conv(layers[0], kernel, stride, groups) and _is_bn(layers[1])
            and type(layers[2]) is nn.ReLU6)


def block_stages(conv: nn.Sequential):
    """The (conv, bn) pairs of a torchvision inverted residual's `conv`
    Sequential, expansion first (None for expand_ratio 1), and the stride;
    None when `conv` does not have exactly that structure."""
    layers = _children(conv)
    if layers is None or len(layers) not in (3, 4):
        return None
    expand = layers[0] if len(layers) == 4 else None
    dw, project, project_bn = layers[-3:]
    dw_layers = _children(dw)
    if not (dw_layers and isinstance(dw_layers[0], nn.Conv2d)):
        return None
    hidden, stride = dw_layers[0].out_channels, dw_layers[0].stride[0]
    if stride not in (1, 2) or not _is_conv_bn_relu6(dw, 3, stride, hidden):
        return None
    if expand is not None and not _is_conv_bn_relu6(expand, 1, 1, 1):
        return None
    if not (_is_conv(project, 1, 1, 1) and _is_bn(project_bn)):
        return None
    stages = [None if expand is None else tuple(_children(expand)[:2]),
              tuple(dw_layers[:2]), (project, project_bn)]
    return stages, stride


def has_hooks(module: nn.Module, pre: bool = True) -> bool:
    """Forward (and, with pre, forward-pre) or backward hooks on `module`."""
    return bool(module._forward_hooks or module._backward_hooks or module._backward_pre_hooks
                or (pre and module._forward_pre_hooks))


def _runs_hooks(conv: nn.Sequential) -> bool:
    """Whether running the submodules would run hooks (on one of them, or
    global module hooks), which the fused paths would skip: pruning and
    weight-norm pre-hooks rewrite weights, forward hooks observe outputs."""
    if (_module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks
            or _module_hooks._global_backward_hooks or _module_hooks._global_backward_pre_hooks):
        return True
    stack = [conv]
    while stack:  # conv.modules() without its bookkeeping: this runs on every forward
        module = stack.pop()
        if module is None:  # a child registered as None
            continue
        if has_hooks(module):
            return True
        stack += module._modules.values()
    return False


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
    """torch's factor: momentum, or the cumulative average's 1/batches for
    momentum=None (0, no update, without a num_batches_tracked buffer)."""
    if bn.momentum is None:
        if bn.num_batches_tracked is None:
            return 0.0
        return 1.0 / float(bn.num_batches_tracked + 1)
    return bn.momentum


def _of_torchs_dtypes(stages, dtype: torch.dtype) -> bool:
    """torch's dtype rule for the block's tensors with an input of `dtype`:
    each convolution's weight in that dtype, each batch norm's tensors in
    one dtype, the input's or (mixed precision) float32."""
    norm_dtypes = (dtype, torch.float32) if dtype in (torch.bfloat16, torch.float16) else (dtype,)
    for conv, bn in filter(None, stages):
        norm = {t.dtype for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)
                if t is not None}
        if conv.weight.dtype != dtype or len(norm) > 1 or not norm <= set(norm_dtypes):
            return False
    return True


def _stage_params(stages) -> List[Optional[Tensor]]:
    """conv weight, bn weight, bn bias of each stage (Nones for a missing
    expansion or a non-affine batch norm)."""
    out = []
    for pair in stages:
        conv, bn = pair if pair is not None else (None, None)
        out += [None, None, None] if conv is None else [conv.weight, bn.weight, bn.bias]
    return out


def _check_values_per_channel(x: Tensor, stages, stride: int) -> None:
    """Batch statistics need more than one value per channel, at every
    stage: checked before any stage runs, so no running statistic moves."""
    N, _, H, W = x.shape
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    sizes = [None if stages[0] is None else (N, stages[0][0].out_channels, H, W),
             (N, stages[1][0].out_channels, Ho, Wo), (N, stages[2][0].out_channels, Ho, Wo)]
    for size in filter(None, sizes):
        if size[0] * size[2] * size[3] == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {torch.Size(size)}")


def _kernel_devices(op: str) -> frozenset:
    """The device types for which torch.ops.normops.<op> has a kernel (the
    extension registered them on import)."""
    return frozenset(d for d in ("cpu", "cuda")
                     if torch._C._dispatch_has_kernel_for_dispatch_key(f"normops::{op}", d.upper()))


# Training runs on the batch-norm ops (CPU; CUDA in a CUDA build), eval on the
# fused op (CPU).
_TRAIN_DEVICES = _kernel_devices("batch_norm")
_EVAL_DEVICES = _kernel_devices("inverted_residual")


def _uses_normops_depthwise(x: Tensor) -> bool:
    """The depthwise stage runs normops' kernel (CPU, float32/float64), and
    then the whole block runs channels_last: ATen's CPU convolutions are
    several times slower on NCHW."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _depthwise(h: Tensor, w: Tensor, stride: int, norm: tuple = ()) -> Tensor:
    """The depthwise stage; `norm`, the op's norm arguments for the
    expansion's batch norm and ReLU6 (mean, var, weight, bias, eps,
    activation), is applied by normops' kernel as it reads h (see
    _fuses_expand_norm)."""
    if _uses_normops_depthwise(h):
        return call(ops.depthwise_conv3x3, h, w, stride, *norm)
    return F.conv2d(h, w, None, stride, 1, 1, w.size(0))


def _as_matrix(h: Tensor) -> bool:
    """Whether the 1x1 convolutions of h run as matrix products: a
    channels_last CPU image (batch 1) is an (H*W) x C matrix. torch.mm on it
    ran up to 1.5x (forward) and 2.7x (both gradients) the speed of torch's
    convolution for MobileNetV2's 1x1 convolutions of 7x7 to 56x56 images
    (2 threads), but 0.9x at 112x112; at batch 2 no gain, at 4 a loss."""
    return (_uses_normops_depthwise(h) and h.size(0) == 1 and h.size(2) * h.size(3) <= 56 * 56
            and h.is_contiguous(memory_format=torch.channels_last))


def _matrix(t: Tensor) -> Tensor:
    """A channels_last (1, C, H, W) tensor as its (H*W) x C matrix (a view)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.size(1))


def _image(m: Tensor, like: Tensor) -> Tensor:
    """An (H*W) x C matrix as a channels_last (1, C, H, W) view, H and W
    those of `like`."""
    return m.view(1, like.size(2), like.size(3), m.size(1)).permute(0, 3, 1, 2)


def _pointwise(h: Tensor, w: Tensor) -> Tensor:
    """A 1x1 convolution without bias (see _as_matrix)."""
    if _as_matrix(h):
        return _image(torch.mm(_matrix(h), w.reshape(w.size(0), -1).t()), h)
    return F.conv2d(h, w)


def _pointwise_backward(g: Tensor, h: Tensor, w: Tensor, need_input: bool, need_weight: bool):
    """The gradients of _pointwise(h, w) for output gradient g (None where
    not needed)."""
    if not _as_matrix(h):
        grads = torch.ops.aten.convolution_backward(g, h, w, None, [1, 1], [0, 0], [1, 1], False,
                                                    [0, 0], 1, [need_input, need_weight, False])
        return (grads[0] if need_input else None), (grads[1] if need_weight else None)
    g2 = _matrix(g)
    grad_input = _image(torch.mm(g2, w.reshape(w.size(0), -1)), h) if need_input else None
    grad_weight = torch.mm(g2.t(), _matrix(h)).view(w.shape) if need_weight else None
    return grad_input, grad_weight


def _fuses_expand_norm(x: Tensor, expand_weight: Optional[Tensor]) -> bool:
    """Whether the recomputing training path hands the expansion's batch
    norm to normops' depthwise kernel, which applies it to the expanded
    tensor as it reads it: the normalised tensor, the block's largest, is
    then never stored, in the forward or in the backward's recomputation."""
    return expand_weight is not None and _uses_normops_depthwise(x)


def _train_forward(x: Tensor, params, stages, stride: int, residual: bool,
                   fuse_expand_norm: bool = False):
    """The block in training mode: 1x1 convolutions (_pointwise), normops'
    depthwise convolution and batch-norm op (ReLU6 fused into the first two),
    with the given parameter tensors, channels_last where normops' depthwise
    kernel runs (the backward redoes that copy of the input). Returns the
    output (in x's layout), the projection's pre-norm output
    (bottleneck-sized) and the three batch norms' batch (mean, var); moves
    the running statistics once everything has succeeded. With grad enabled
    it records the graph (the ops are differentiable: memory_efficient=False);
    _RecomputedTrainBlock runs it without, and with fuse_expand_norm (see
    _fuses_expand_norm)."""
    ew, ebw, ebb, dw, dbw, dbb, pw, pbw, pbb = params
    modules = [None if p is None else p[1] for p in stages]
    x_run = x
    if _uses_normops_depthwise(x):
        x_run = x.contiguous(memory_format=torch.channels_last)
    stats, h, expand_norm = [None], x_run, ()
    if ew is not None:
        h = _pointwise(x_run, ew)
        if fuse_expand_norm and _fuses_expand_norm(x, ew):
            mean, var = ops.batch_norm_stats(h)
            expand_norm = (mean, var, ebw, ebb, modules[0].eps, _RELU6)
        else:
            h, mean, var = call(ops.batch_norm, h, ebw, ebb, None, None, True, modules[0].eps,
                                _RELU6)
        stats[0] = (mean, var, h.numel() // h.size(1))
    h = _depthwise(h, dw, stride, expand_norm)
    h, mean, var = call(ops.batch_norm, h, dbw, dbb, None, None, True, modules[1].eps, _RELU6)
    stats.append((mean, var, h.numel() // h.size(1)))
    pre_norm = _pointwise(h, pw)
    h, mean, var = call(ops.batch_norm, pre_norm, pbw, pbb, None, None, True, modules[2].eps, 0)
    stats.append((mean, var, h.numel() // h.size(1)))
    for module, stat in zip(modules, stats):
        if (module is None or not module.training or not module.track_running_stats
                or module.running_mean is None):
            continue
        update_running_stats(module.running_mean, module.running_var, *stat, _momentum(module))
        if module.num_batches_tracked is not None:
            module.num_batches_tracked.add_(1)
    out = h + x_run if residual else h
    if x_run is not x and not channels_last_output(x):
        out = out.contiguous()  # torch's block keeps an NCHW input's layout
    return out, pre_norm, [None if st is None else st[:2] for st in stats]


def _reference_train_forward(x: Tensor, params, eps, stride: int, residual: bool) -> Tensor:
    """The training block in differentiable torch ops (batch statistics, no
    running-statistic update): what double backward differentiates."""
    ew, ebw, ebb, dw, dbw, dbb, pw, pbw, pbb = params
    h = x
    if ew is not None:
        h = F.relu6(F.batch_norm(F.conv2d(h, ew), None, None, ebw, ebb, True, 0.0, eps[0]))
    h = F.conv2d(h, dw, None, stride, 1, 1, dw.size(0))
    h = F.relu6(F.batch_norm(h, None, None, dbw, dbb, True, 0.0, eps[1]))
    h = F.batch_norm(F.conv2d(h, pw), None, None, pbw, pbb, True, 0.0, eps[2])
    return h + x if residual else h


class _RecomputedTrainBlock(torch.autograd.Function):
    """Training forward without a graph, saving the input, the projection's
    pre-norm output (both bottleneck-sized), the parameters and the batch
    statistics (C values per batch norm); the backward recomputes the
    expanded activations from them and runs the convolution and batch-norm
    backward ops down the chain."""

    @staticmethod
    def forward(ctx, stages, stride, residual, x, *params):
        with below_autograd():  # the forward of an autograd.Function records nothing
            out, h3, stats = _train_forward(x, params, stages, stride, residual,
                                            fuse_expand_norm=True)
        flat = [t for st in stats for t in (st if st is not None else (None, None))]
        ctx.save_for_backward(x, h3, *params, *flat)
        ctx.stride, ctx.residual = stride, residual
        ctx.eps = [None if p is None else p[1].eps for p in stages]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, h3, *rest = ctx.saved_tensors
        params, flat = rest[:9], rest[9:]
        needs = ctx.needs_input_grad[3:]
        if needs_double_backward(grad_out, x, *params):  # create_graph=True
            grads = torch_grads(
                lambda x, *p: _reference_train_forward(x, p, ctx.eps, ctx.stride, ctx.residual),
                (x, *params), needs, grad_out)
            return (None, None, None, *grads)
        with below_autograd(grad_out, x, *params):
            grads = _recomputed_backward(ctx, grad_out, x, h3, params, flat, needs)
        return (None, None, None, *grads)


def _recomputed_backward(ctx, grad_out, x, h3, params, flat, needs):
    """_RecomputedTrainBlock's backward (not differentiable): the expanded
    activations recomputed from x with the forward's statistics, then the
    convolution and batch-norm backward ops down the chain. Returns the
    gradients of x and the nine parameters."""
    ew, ebw, ebb, dw, dbw, dbb, pw, pbw, pbb = params
    (m1, v1), (m2, v2), (m3, v3) = zip(flat[0::2], flat[1::2])
    if _uses_normops_depthwise(x):  # the layout the forward ran in
        x = x.contiguous(memory_format=torch.channels_last)
    s = ctx.stride
    # The activations, recomputed with the forward's statistics; the
    # expansion's normalised output only where the depthwise kernel does not
    # normalise as it reads.
    h1, dw_in, expand_norm = None, x, ()
    if ew is not None:
        h1 = dw_in = _pointwise(x, ew)
        if _fuses_expand_norm(x, ew):
            expand_norm = (m1, v1, ebw, ebb, ctx.eps[0], _RELU6)
        else:
            dw_in = ops.batch_norm_elemt(h1, ebw, ebb, m1, v1, ctx.eps[0], _RELU6)
    h2 = _depthwise(dw_in, dw, s, expand_norm)
    a2 = ops.batch_norm_elemt(h2, dbw, dbb, m2, v2, ctx.eps[1], _RELU6)

    def bn_backward(g, h, w, b, mean, var, eps, act, need_w, need_b):
        gi, gw, gb = ops.batch_norm_backward(g, h, w, b, mean, var, True, eps, act,
                                             [True, need_w, need_b])
        return gi, (gw if need_w else None), (gb if need_b else None)

    dh3, g_pbw, g_pbb = bn_backward(grad_out, h3, pbw, pbb, m3, v3, ctx.eps[2], 0,
                                    needs[8], needs[9])
    da2, g_pw = _pointwise_backward(dh3, a2, pw, True, needs[7])
    dh2, g_dbw, g_dbb = bn_backward(da2, h2, dbw, dbb, m2, v2, ctx.eps[1], _RELU6,
                                    needs[5], needs[6])
    need_dw_in = needs[0] or ew is not None
    if _uses_normops_depthwise(dw_in):
        d_in, g_dw = ops.depthwise_conv3x3_backward(
            dh2, dw_in, dw, s, [need_dw_in, needs[4]], *expand_norm)
        d_in, g_dw = (d_in if need_dw_in else None), (g_dw if needs[4] else None)
    else:
        d_in, g_dw = torch.ops.aten.convolution_backward(
            dh2, dw_in, dw, None, [s, s], [1, 1], [1, 1], False, [0, 0], dw.size(0),
            [need_dw_in, needs[4], False])[:2]
    g_ew = g_ebw = g_ebb = None
    dx = d_in
    if ew is not None:
        dh1, g_ebw, g_ebb = bn_backward(d_in, h1, ebw, ebb, m1, v1, ctx.eps[0], _RELU6,
                                        needs[2], needs[3])
        dx, g_ew = _pointwise_backward(dh1, x, ew, needs[0], needs[1])
    if needs[0] and ctx.residual:
        dx = dx + grad_out
    return [dx if needs[0] else None, g_ew, g_ebw, g_ebb, g_dw, g_dbw, g_dbb, g_pw, g_pbw,
            g_pbb]


class InvertedResidual(nn.Module):
    """torchvision.models.mobilenetv2.InvertedResidual, fused (see the module
    docstring). `memory_efficient` chooses how training saves for backward."""

    __prepare_scriptable__ = refuse_script

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
            layers.append(Conv2dNormActivation(inp, hidden_dim, 1, 1, 1, norm_layer))
        layers += [Conv2dNormActivation(hidden_dim, hidden_dim, 3, stride, hidden_dim, norm_layer),
                   nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), norm_layer(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1
        self.memory_efficient = memory_efficient

    def extra_repr(self) -> str:
        return f"memory_efficient={self.memory_efficient}"

    def __getstate__(self):
        # The fold cache is derived from the weights: torch.save(module) and
        # deepcopy would store them twice more (mobilenet_v2: 14 -> 29 MB).
        state = dict(super().__getstate__())  # a copy: the module keeps its cache
        state.pop("_fold_cache", None)
        return state

    def _folded(self, stages, dtype: torch.dtype) -> Optional[List[Optional[Tensor]]]:
        """Folded weights and biases, cached while the parameters, running
        statistics and eps hold what was folded, unless they carry a graph or
        are inference tensors, or a trace would record the cache as its
        constants. The contents are compared, not the version counters, which
        writes through .data, fused optimizers and NumPy views leave alone:
        comparing the weights (memcmp) costs a fraction of folding them
        (160-channel block at batch 1: ~40 of 300 us). None where a tensor is
        not of the input's dtype: the children then raise torch's error."""
        # Read from the modules' dicts: nn.Module.__getattr__ took a third of
        # this function's time on a small block (block_stages checked the types).
        tensors = []
        for pair in filter(None, stages):
            conv, bn = pair
            tensors.append(conv._parameters["weight"])
            tensors += [t for t in (bn._parameters.get("weight"), bn._parameters.get("bias"),
                                    bn._buffers.get("running_mean"), bn._buffers.get("running_var"))
                        if t is not None]
        differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        cacheable = not (differentiable or torch.compiler.is_compiling() or torch.jit.is_tracing()
                         or any(t.is_inference() for t in tensors))
        key = None
        if cacheable:  # which tensors fill which roles; same_contents compares the rest
            key = (tuple(map(id, tensors)), tuple(bn.eps for _, bn in filter(None, stages)))
        cached = getattr(self, "_fold_cache", None)
        if (key is not None and cached is not None and cached[0] == key
                and same_contents(tensors, cached[1])):
            return cached[2]  # same dtypes (same_contents), checked when cached
        if not _of_torchs_dtypes(stages, dtype):
            return None
        filling = contextlib.ExitStack()
        if key is not None and torch.is_inference_mode_enabled():
            # A cache filled under inference_mode would hold inference
            # tensors, which a later call recording a graph cannot save
            # (input gradients of a frozen model): filled outside it, and
            # without a graph (leaving inference_mode turns grad mode on).
            filling.enter_context(torch.inference_mode(False))
            filling.enter_context(torch.no_grad())
        with filling:
            folded = []
            for pair in stages:
                folded += [None, None] if pair is None else list(_fold(*pair))
            if key is not None:
                self._fold_cache = (key, [t.detach().clone() for t in tensors], folded)
        return folded

    def _needs_torch_rules(self, x: Tensor) -> bool:
        """torch.func transforms and forward-mode AD need rules (batching,
        jvp) that the fused ops lack: the submodules have them."""
        return needs_torch_rules(x) or (
            fwAD._current_level >= 0 and needs_torch_rules(*self.parameters()))

    @fx_leaf
    def forward(self, x: Tensor) -> Tensor:
        stages, stride = block_stages(self.conv) or (None, None)
        # Under autocast the children run, in the dtypes torch's policy gives
        # each op; an input of another dtype than the weights gets their error.
        # The weight's dtype is read after the hooks check: pruning's hooks
        # turn it into a plain attribute.
        if (stages is not None and x.dim() == 4 and x.device.type in _TRAIN_DEVICES
                and not torch.is_autocast_enabled(x.device.type)
                and not _runs_hooks(self.conv) and not self._needs_torch_rules(x)
                and x.dtype == stages[1][0].weight.dtype):
            norms = [bn for _, bn in filter(None, stages)]
            # Each batch norm's own mode decides, as in the unfused block
            # (a frozen BN in a training model uses its running statistics).
            batch_stats = [bn.training or bn.running_mean is None for bn in norms]
            # torch.jit.trace records the training path's Python numbers
            # (values per channel, the batch-1 matrix products) as constants:
            # the children's batch norms count at run time.
            if all(batch_stats) and not torch.jit.is_tracing():
                _check_values_per_channel(x, stages, stride)
                params = _stage_params(stages)
                # Dynamo cannot trace the recomputing backward: there the
                # graph is recorded (AOTAutograd's partitioner chooses what
                # to save).
                if self.memory_efficient and not torch.compiler.is_compiling():
                    return _RecomputedTrainBlock.apply(stages, stride, self.use_res_connect, x,
                                                       *params)
                return _train_forward(x, params, stages, stride, self.use_res_connect)[0]
            folded = (self._folded(stages, x.dtype)
                      if not any(batch_stats) and x.device.type in _EVAL_DEVICES else None)
            if folded is not None:
                return call(ops.inverted_residual, x, *folded, stride, self.use_res_connect)
        y = self.conv(x)
        return x + y if self.use_res_connect else y
