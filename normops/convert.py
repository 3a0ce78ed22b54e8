"""normops.convert: swap the standard norm modules of a model for normops'."""
import dis

import torch
from torch.nn.modules.lazy import LazyModuleMixin

from . import nn as nnops
from .inverted_residual import block_stages, has_hooks

# Exact torch.nn type -> normops type. Subclasses of these are left alone:
# they may override forward.
_SWAPS = {
    torch.nn.BatchNorm1d: nnops.BatchNorm1d,
    torch.nn.BatchNorm2d: nnops.BatchNorm2d,
    torch.nn.BatchNorm3d: nnops.BatchNorm3d,
    torch.nn.SyncBatchNorm: nnops.SyncBatchNorm,
    torch.nn.LayerNorm: nnops.LayerNorm,
    torch.nn.GroupNorm: nnops.GroupNorm,
    torch.nn.InstanceNorm1d: nnops.InstanceNorm1d,
    torch.nn.InstanceNorm2d: nnops.InstanceNorm2d,
    torch.nn.InstanceNorm3d: nnops.InstanceNorm3d,
}


def fuse_norm_activations(seq: torch.nn.Sequential, shared: set) -> None:
    """A BatchNorm2d directly followed by ReLU/ReLU6 in a Sequential becomes a
    BatchNormAct2d; the activation's slot becomes a FusedActivation (an
    Identity while the batch norm there fuses it), so indices and state_dict
    keys stay. Not when the fusion would show: a Sequential
    subclass with its own forward may skip or reorder its children, a batch
    norm also used elsewhere in the model (`shared` ids) would apply the
    activation there too, a hook on its output would see the activation's,
    and the activation's own hooks would no longer run."""
    if type(seq).forward is not torch.nn.Sequential.forward:
        return
    names = list(seq._modules)
    for first, second in zip(names, names[1:]):
        bn, act = seq._modules[first], seq._modules[second]
        if (type(bn) in (torch.nn.BatchNorm2d, nnops.BatchNorm2d)
                and type(act) in nnops.FUSIBLE_ACTIVATIONS and id(bn) not in shared
                and not has_hooks(bn, pre=False) and not has_hooks(act)):
            bn.__class__ = nnops.BatchNormAct2d
            bn.activation = nnops.FUSIBLE_ACTIVATIONS[type(act)]
            slot = nnops.FusedActivation(act, seq, first)
            slot.train(act.training)
            seq._modules[second] = slot


def _has_torchvision_forward(cls) -> bool:
    """Whether cls.forward is torchvision's `x + self.conv(x) if
    self.use_res_connect else self.conv(x)`, compared by its bytecode: the
    attributes it reads, no constants, one addition. A copy of torchvision's
    class passes; a forward that scales, subtracts or adds anything does not."""
    code = getattr(cls.forward, "__code__", None)
    if code is None or code.co_argcount != 2 or code.co_kwonlyargcount or code.co_flags & 0x0C:
        return False
    if set(code.co_names) != {"use_res_connect", "conv"} or any(
            c is not None for c in code.co_consts):
        return False
    arithmetic = [(i.opname, i.arg) for i in dis.get_instructions(code)
                  if i.opname.startswith(("BINARY", "INPLACE"))]
    return arithmetic in ([("BINARY_OP", 0)], [("BINARY_ADD", None)])


def _inverted_residual_stride(module: torch.nn.Module):
    """The stride of a torchvision-style InvertedResidual, else None. Recognised
    by structure, not by import: a class named InvertedResidual deriving
    directly from nn.Module, with torchvision's forward, no parameters, buffers
    or children of its own but a `conv` Sequential of [1x1 conv, BN, ReLU6],
    [3x3 depthwise, BN, ReLU6], 1x1 conv, BN, and a `use_res_connect` that
    matches it."""
    if type(module) is not nnops.InvertedResidual and not (
            type(module).__name__ == "InvertedResidual"
            and type(module).__bases__ == (torch.nn.Module,)
            and _has_torchvision_forward(type(module))):
        return None
    if (not hasattr(module, "use_res_connect") or set(module._modules) != {"conv"}
            or module._parameters or module._buffers):
        return None
    found = block_stages(getattr(module, "conv", None))
    if found is None:
        return None
    stages, stride = found
    project = stages[2][0]
    in_channels = (stages[0] or stages[1])[0].in_channels
    residual = stride == 1 and in_channels == project.out_channels
    return stride if module.use_res_connect == residual else None


def convert(model: torch.nn.Module, fuse_activations: bool = True) -> torch.nn.Module:
    """Replace, in place, every torch.nn BatchNorm1d/2d/3d, SyncBatchNorm,
    LayerNorm, GroupNorm and InstanceNorm1d/2d/3d in `model` with its normops
    module; turn torchvision-style MobileNetV2 InvertedResidual blocks
    (recognised by structure) into normops.nn.InvertedResidual; with
    fuse_activations, fuse the other BatchNorm2d -> ReLU/ReLU6 pairs of an
    nn.Sequential into BatchNormAct2d. A lazy one (LazyBatchNorm2d, ...)
    becomes the normops module at its first forward, unfused. The modules
    keep their identity, parameters, buffers, hooks and training flag (only
    their class changes), so optimizers and state_dict keys are unaffected.
    Returns `model`.

    A fused pair's batch norm applies the activation itself, so code that
    runs a Sequential only up to it (`seq[:k]`, `seq[i](x)`, iterating over
    its children to tap features) sees activated outputs, and so does code
    that edits it afterwards (replacing or hooking the activation's slot,
    inserting a module after the batch norm): convert such models with
    fuse_activations=False."""
    seen, shared = set(), set()
    for _, m in model.named_modules(remove_duplicate=False):
        (shared if id(m) in seen else seen).add(id(m))
    blocks = [(m, s) for m in model.modules()
              if (s := _inverted_residual_stride(m)) is not None]
    in_blocks = {id(sub) for block, _ in blocks for sub in block.conv.modules()}
    for block, stride in blocks:  # normops' own blocks included: nothing inside them fuses
        if type(block) is not nnops.InvertedResidual:
            block.__class__ = nnops.InvertedResidual
            block.stride, block.memory_efficient = stride, True
    for module in model.modules():
        if (fuse_activations and isinstance(module, torch.nn.Sequential)
                and id(module) not in in_blocks):
            fuse_norm_activations(module, shared)
        swap = _SWAPS.get(type(module))
        if swap is not None:
            module.__class__ = swap
        # A lazy module turns into its cls_to_become at its first forward.
        elif isinstance(module, LazyModuleMixin) and module.cls_to_become in _SWAPS:
            module.cls_to_become = _SWAPS[module.cls_to_become]
    return model
