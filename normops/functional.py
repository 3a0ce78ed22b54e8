"""Functional interface: the signatures of torch.nn.functional, computed by
the normops ops. Batch norm also takes `activation=None|'relu'|'relu6'`,
fused into the same kernels.

Running statistics are updated here, on the buffers, after the op has
succeeded: a call that raises leaves them untouched.
"""
import contextlib
import numbers
from typing import List, Optional, Union

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as TF
from torch import Tensor

from .ops._common import call
from .ops.batch_norm import ACTIVATIONS, apply_activation

__all__ = ["batch_norm", "layer_norm", "instance_norm", "group_norm"]

ops = torch.ops.normops


def needs_torch_rules(*tensors: Optional[Tensor]) -> bool:
    """True inside torch.func transforms (vmap, grad, jvp, jacfwd, ...) and
    when a tensor carries a forward-mode tangent (torch.autograd.forward_ad).
    The normops ops have no batching or forward-mode rules, so there the same
    computation runs on torch.nn.functional instead of dropping the tangents.
    (Not while torch.compile traces: it runs the ops.)"""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return fwAD._current_level >= 0 and any(
        t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _autocast_off(device_type: str):
    # torch.is_autocast_enabled raises for a device without autocast (meta).
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _traced_running_update(update: bool, running_mean: Optional[Tensor],
                           running_var: Optional[Tensor]) -> bool:
    """torch.jit.trace records the Python ints of a call as constants, the
    batch count of the running variance's correction among them: a traced
    running-statistic update runs torch's op, which counts at run time."""
    return update and torch.jit.is_tracing() and (
        running_mean is not None or running_var is not None)


def _check_momentum(momentum, name: str) -> None:
    # torch's argument parser raises this TypeError (the modules' momentum=None
    # is resolved into a float before the call); what it converts passes,
    # and a symbolic float under torch.compile.
    if not isinstance(momentum, (numbers.Real, Tensor, torch.SymFloat, torch.SymInt)):
        raise TypeError(
            f"{name}(): argument 'momentum' must be float, not {type(momentum).__name__}")


def _check_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    # No gradient flows to the running statistics; torch refuses them too.
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"normalization is not differentiable with respect to {name}: "
                               "it cannot have requires_grad=True")


def _activation_code(activation: Optional[str]) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of None, 'relu', 'relu6', but got {activation!r}")
    return ACTIVATIONS[activation]


def _values_per_channel(size) -> int:
    n = size[0]
    for s in size[2:]:
        n *= s
    return n


def _check_floating(input: Tensor, name: str) -> None:
    # NotImplementedError, as torch raises for these dtypes (a RuntimeError).
    if not input.is_floating_point():
        raise NotImplementedError(
            f"{name}: not implemented for {input.dtype}; expected a floating point input")


def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         mean: Tensor, var: Tensor, count: int, momentum: float) -> None:
    """Batch norm's running statistics after a batch of `count` values per
    channel with this mean and biased variance: the running variance is the
    unbiased one. No update for an empty batch. Eager: one kernel for both.
    Under torch.compile: ATen ops, which inductor fuses, and which take the
    symbolic float that momentum=None's 1/num_batches_tracked is there."""
    if count <= 0 or (running_mean is None and running_var is None):
        return
    with torch.no_grad():
        if not torch.compiler.is_compiling():
            ops.update_running_stats(running_mean, running_var, mean, var, momentum, count)
            return
        unbiased = var * (count / max(count - 1, 1))
        for running, value in ((running_mean, mean), (running_var, unbiased)):
            if running is not None:
                running.mul_(1.0 - momentum).add_(value.to(running.dtype), alpha=momentum)


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: Optional[str] = None,
) -> Tensor:
    """torch.nn.functional.batch_norm, optionally followed by a fused ReLU or
    ReLU6."""
    act = _activation_code(activation)
    _check_momentum(momentum, "batch_norm")
    if (needs_torch_rules(input, running_mean, running_var, weight, bias)
            or _traced_running_update(training, running_mean, running_var)):
        return apply_activation(TF.batch_norm(input, running_mean, running_var, weight, bias,
                                              training, momentum, eps), act)
    _check_floating(input, "batch_norm")
    if input.dim() < 2:
        raise RuntimeError(f"batch_norm: expected at least 2D input (got {input.dim()}D input)")
    if training and _values_per_channel(input.size()) == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, "
            f"got input size {input.size()}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if not training:  # before the pair check: torch's error type here
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
    _check_running_stats(running_mean, running_var)
    out, mean, var = call(ops.batch_norm, input, weight, bias, running_mean, running_var,
                          training, eps, act)
    if training:
        update_running_stats(running_mean, running_var, mean, var,
                             input.numel() // max(input.size(1), 1), momentum)
    return out


def layer_norm(
    input: Tensor,
    normalized_shape: Union[int, List[int], torch.Size],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """torch.nn.functional.layer_norm."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if needs_torch_rules(input, weight, bias):
        return TF.layer_norm(input, normalized_shape, weight, bias, eps)
    _check_floating(input, "layer_norm")
    return call(ops.layer_norm, input, list(normalized_shape), weight, bias, eps)[0]


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """torch.nn.functional.group_norm."""
    if needs_torch_rules(input, weight, bias):
        return TF.group_norm(input, num_groups, weight, bias, eps)
    if input.dim() < 2:
        raise RuntimeError(
            f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    _check_floating(input, "group_norm")
    if input.size(1) % num_groups != 0:
        raise RuntimeError(
            "Expected number of channels in input to be divisible by num_groups, but got "
            f"input of shape {list(input.shape)} and num_groups={num_groups}")
    if _values_per_channel([input.size(0) * input.size(1) // num_groups, num_groups]
                           + list(input.size()[2:])) == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{[input.size(0) * input.size(1) // num_groups, num_groups] + list(input.size()[2:])}")
    return call(ops.group_norm, input, num_groups, weight, bias, eps)[0]


def instance_norm(
    input: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """torch.nn.functional.instance_norm: group norm with one channel per
    group, computed in the input's layout (channels_last stays
    channels_last). The running statistics are the mean over the batch of the
    per-instance statistics, with the unbiased variance."""
    _check_momentum(momentum, "instance_norm")
    # eps = 0: torch normalises a constant instance to 0 (its batch norm's
    # invstd is 0 where var and eps are), group norm to NaN.
    if (needs_torch_rules(input, running_mean, running_var, weight, bias)
            or _traced_running_update(use_input_stats, running_mean, running_var)
            or (use_input_stats and eps == 0.0)):
        return TF.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                                momentum, eps)
    _check_floating(input, "instance_norm")
    if not use_input_stats:  # a batch norm with the running statistics (N, C) input too
        if running_mean is None or running_var is None:
            raise RuntimeError(
                "Expected running_mean and running_var to be defined when use_input_stats is false")
        _check_running_stats(running_mean, running_var)
        # Torch's instance norm reads running statistics of any floating
        # dtype; batch norm's rule wants the input's (float32 for bf16/fp16).
        stat_dtype = torch.float32 if input.dtype in (torch.bfloat16, torch.float16) else input.dtype
        return call(ops.batch_norm, input, weight, bias, running_mean.to(stat_dtype),
                    running_var.to(stat_dtype), False, eps, 0)[0]
    if input.dim() < 3:
        raise ValueError(
            f"instance_norm: expected at least 3D input (N, C, *) (got {input.dim()}D input)")
    spatial = _values_per_channel([1, 1] + list(input.size()[2:]))
    if spatial == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {input.size()}")
    _check_running_stats(running_mean, running_var)
    C = input.size(1)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (C,):
            raise RuntimeError(
                f"instance_norm: expected {name} of shape [{C}], but got {list(t.shape)}")
    # Under autocast torch's instance norm runs in the input dtype (it is a
    # batch norm there), not in group norm's float32.
    with _autocast_off(input.device.type):
        out, mean, rstd = call(ops.group_norm, input, C, weight, bias, eps)
    if input.numel() > 0 and (running_mean is not None or running_var is not None):
        with torch.no_grad():
            # The batch's mean of the per-instance statistics, the biased
            # variance (update_running_stats makes it unbiased) from rstd:
            # rstd^-2 - eps keeps rstd's precision where the variance is at
            # least 1000 eps. Below, it cancels (a quarter of the value lost
            # at 1e-12 against 1e-5), and the variance is computed again, a
            # pass over the input (always while compiling and on meta
            # tensors: no data-dependent branch there).
            # A NaN (eps <= 0: rstd of a constant instance inf, or NaN)
            # fails `var >= 1e3 * eps` too.
            var = rstd.double().pow(-2).sub_(eps)
            if (torch.compiler.is_compiling() or input.device.type == "meta"
                    or not bool((var >= 1e3 * eps).all())):
                var = input.to(mean.dtype).var(dim=tuple(range(2, input.dim())), correction=0)
            update_running_stats(running_mean, running_var, mean.mean(0),
                                 var.to(mean.dtype).mean(0), spatial, momentum)
    return out
