"""Drop-in modules. Each subclasses its torch.nn counterpart, so constructor
arguments, defaults, parameters, buffers, state_dict keys, checkpoint loading
and isinstance checks are torch's own; only the computation is normops'.
"""
import weakref
from typing import Optional

import torch
from torch import Tensor

from . import functional as F
from ._fx import fx_leaf, refuse_script
from .sync_batch_norm import check_sync_input_dim, sync_batch_norm, world_size

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct2d", "SyncBatchNorm", "LayerNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "GroupNorm", "InvertedResidual",
    "FusedActivation",
]


def _bias_kwarg(bias: bool) -> dict:
    """torch's keyword-only `bias=` of the batch norms (torch >= 2.12), passed
    only when not the default: an older torch then builds the module as it
    always did, and refuses bias=False as torch.nn itself does there."""
    return {} if bias else {"bias": False}


class _BatchNormForward:
    """torch's _BatchNorm.forward on normops.functional.batch_norm, with the
    module's fused activation (None for plain batch norm). num_batches_tracked
    moves only once the op has succeeded, except inside torch.func
    transforms: there torch's op updates the running statistics in place, and
    an in-place update of a captured buffer raises, so the counter moves
    first, as in torch, which keeps a refused call from moving anything (as
    for a counter made under torch.inference_mode, which cannot move
    outside it)."""

    activation: Optional[str] = None
    __prepare_scriptable__ = refuse_script

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        tracking = self.training and self.track_running_stats
        counter = self.num_batches_tracked
        momentum = 0.0 if self.momentum is None else self.momentum
        if tracking and counter is not None and self.momentum is None:
            momentum = 1.0 / float(counter + 1)
        count_first = tracking and (F.needs_torch_rules(input) or (
            counter is not None and not torch.compiler.is_compiling()
            and counter.is_inference() and not torch.is_inference_mode_enabled()))
        if count_first and counter is not None:
            counter.add_(1)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_buffers = not self.training or self.track_running_stats
        out = self._batch_norm(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            use_batch_stats, momentum)
        if tracking and not count_first and counter is not None:
            counter.add_(1)
        return out

    def _batch_norm(self, input: Tensor, running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], use_batch_stats: bool,
                    momentum: float) -> Tensor:
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                            use_batch_stats, momentum, self.eps, activation=self.activation)


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    __doc__ = torch.nn.BatchNorm1d.__doc__


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    __doc__ = torch.nn.BatchNorm2d.__doc__


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    __doc__ = torch.nn.BatchNorm3d.__doc__


class BatchNormAct2d(BatchNorm2d):
    """BatchNorm2d followed by a fused ReLU or ReLU6 (or nothing). Same
    parameters, buffers and state_dict as a BatchNorm2d; the backward keeps
    only the input (the activation mask is recomputed from it)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: Optional[str] = "relu", device=None, dtype=None, *,
                 bias: bool = True) -> None:
        F._activation_code(activation)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **_bias_kwarg(bias))
        self.activation = activation

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


# The activations a batch norm can fuse, by the name its `activation` takes.
FUSIBLE_ACTIVATIONS = {torch.nn.ReLU: "relu", torch.nn.ReLU6: "relu6"}


class FusedActivation(torch.nn.Identity):
    """The slot of a ReLU/ReLU6 in a Sequential whose batch norm before it
    applies that activation (normops.convert, normops.models): nothing while
    that slot holds a normops batch norm fusing it; the activation itself
    once something else has taken its place (torch's convert_sync_batchnorm,
    a conv-bn fusion, a hand swap), so that the Sequential still computes
    what the unfused one did."""

    __prepare_scriptable__ = refuse_script

    def __init__(self, activation: torch.nn.Module, seq: torch.nn.Sequential,
                 norm_key: str) -> None:
        super().__init__()
        self.activation = FUSIBLE_ACTIVATIONS[type(activation)]
        self._link(activation, seq, norm_key)

    def _link(self, activation: torch.nn.Module, seq: Optional[torch.nn.Sequential],
              norm_key: str) -> None:
        # Plain attributes, not submodules (no state_dict keys); the Sequential
        # weakly: it holds this slot, and a strong reference back would keep a
        # model alive until the cycle collector runs. Without it (a slot
        # copied or pickled apart from its Sequential) the activation applies,
        # which is always right: ReLU and ReLU6 applied twice are applied once.
        self.__dict__["_unfused"] = (activation, None if seq is None else weakref.ref(seq),
                                     norm_key)

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        activation, seq_ref, norm_key = self._unfused
        seq = None if seq_ref is None else seq_ref()
        norm = None if seq is None else seq._modules.get(norm_key)
        if isinstance(norm, _BatchNormForward) and norm.activation == self.activation:
            return input
        return activation(input)

    # Copies and pickles carry the Sequential itself: a copied model's slots
    # link to its copied Sequentials (the memo); a slot copied alone brings
    # its Sequential along, which nothing else holds, and ends up unlinked.
    def __getstate__(self):
        state = dict(super().__getstate__())
        activation, seq_ref, norm_key = state["_unfused"]
        state["_unfused"] = (activation, None if seq_ref is None else seq_ref(), norm_key)
        return state

    def __setstate__(self, state) -> None:
        activation, seq, norm_key = state.pop("_unfused")
        super().__setstate__(state)
        self._link(activation, seq, norm_key)

    def extra_repr(self) -> str:
        return repr(self.activation)


class SyncBatchNorm(_BatchNormForward, torch.nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm on the normops ops, for CPU tensors (gloo) as
    well as CUDA ones (NCCL), with an optional fused ReLU/ReLU6 after the
    normalisation. In training with more than one rank in the process group
    (default: the world) the statistics are those of the global batch; with
    one rank, no initialised process group, or in eval mode it is a
    BatchNorm. Weight and bias gradients stay per rank, for DDP to reduce.

    Same arguments, attributes, buffers and state_dict as
    torch.nn.SyncBatchNorm, but not a subclass of it: DistributedDataParallel
    refuses CPU models holding a torch.nn.SyncBatchNorm."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True,
                 activation: Optional[str] = None) -> None:
        F._activation_code(activation)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **_bias_kwarg(bias))
        self.process_group = process_group
        self.activation = activation

    def _check_input_dim(self, input: Tensor) -> None:
        if self.training and world_size(self.process_group) > 1:
            return  # checked inside the collective's guard: every rank then raises
        check_sync_input_dim(input)

    def _batch_norm(self, input, running_mean, running_var, use_batch_stats, momentum):
        if self.training and use_batch_stats and world_size(self.process_group) > 1:
            return sync_batch_norm(
                input, running_mean, running_var, self.weight, self.bias, momentum, self.eps,
                F._activation_code(self.activation), self.num_features, self.process_group)
        return super()._batch_norm(input, running_mean, running_var, use_batch_stats, momentum)

    def extra_repr(self) -> str:
        if self.activation is None:
            return super().extra_repr()
        return f"{super().extra_repr()}, activation={self.activation!r}"

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replaces every batch norm of `module` (torch.nn's, its
        SyncBatchNorm, normops') with a normops SyncBatchNorm on
        `process_group`, sharing the parameters and buffers and keeping a
        BatchNormAct2d's activation. Returns the converted module (a new one
        when `module` itself is a batch norm)."""
        converted = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group,
                            bias=module.bias is not None or not module.affine,
                            activation=getattr(module, "activation", None))
            # The same objects: optimizers and other references keep working.
            converted.weight, converted.bias = module.weight, module.bias
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted


class LayerNorm(torch.nn.LayerNorm):
    __doc__ = torch.nn.LayerNorm.__doc__

    __prepare_scriptable__ = refuse_script

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(torch.nn.GroupNorm):
    __doc__ = torch.nn.GroupNorm.__doc__

    __prepare_scriptable__ = refuse_script

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class _InstanceNormApply:
    """torch's _InstanceNorm keeps its checks, no-batch-dim handling and
    warnings; only the normalisation itself is replaced."""

    __prepare_scriptable__ = refuse_script

    forward = fx_leaf(torch.nn.modules.instancenorm._InstanceNorm.forward)

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        return F.instance_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(_InstanceNormApply, torch.nn.InstanceNorm1d):
    __doc__ = torch.nn.InstanceNorm1d.__doc__


class InstanceNorm2d(_InstanceNormApply, torch.nn.InstanceNorm2d):
    __doc__ = torch.nn.InstanceNorm2d.__doc__


class InstanceNorm3d(_InstanceNormApply, torch.nn.InstanceNorm3d):
    __doc__ = torch.nn.InstanceNorm3d.__doc__


from .inverted_residual import InvertedResidual  # noqa: E402  (uses this module's functional)
