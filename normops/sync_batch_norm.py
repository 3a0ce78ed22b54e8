"""Batch norm over the global batch of a torch.distributed process group, on
any device whose backend can all-gather (gloo on CPU, NCCL on CUDA).

Forward: each rank computes its per-channel (count, mean, M2) with the
normops statistics op; one all_gather of that (2C + 1)-vector in float64;
every rank merges the same rows the same way (Chan: exact, no
E[x^2] - E[x]^2), so the normalisation and the running statistics are
identical on every rank. Backward: the local (sum dy, sum dy*(x - mean)), one
all_reduce, the elementwise op. Weight and bias gradients stay local (DDP's
gradient all-reduce sums them), as in torch.nn.SyncBatchNorm.

A rank whose input is invalid still joins the collective, with count -1, and
then raises: the other ranks see the mark and raise too, instead of waiting
for a collective that never comes.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .functional import update_running_stats
from .ops._common import acc_dtype

ops = torch.ops.normops

_FAILED = -1.0


def world_size(process_group) -> int:
    """Ranks in the group, 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def check_sync_input_dim(input: Tensor) -> None:
    """torch.nn.SyncBatchNorm's input checks, with its messages."""
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    if input.size(1) == 0:
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")


def _check_args(input: Tensor, weight, bias, running_mean, running_var, num_features: int):
    """The module's input checks and what would make the elementwise step
    fail after the collective."""
    check_sync_input_dim(input)
    if not input.is_floating_point():
        raise NotImplementedError(
            f"SyncBatchNorm: not implemented for {input.dtype}; expected a floating point input")
    if input.size(1) != num_features:
        raise RuntimeError(
            f"SyncBatchNorm: expected input with {num_features} channels, but got input of "
            f"size {list(input.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        if t.shape != (num_features,):
            raise RuntimeError(
                f"SyncBatchNorm: expected {name} of shape [{num_features}], but got "
                f"{list(t.shape)}")
        if t.device != input.device:
            raise RuntimeError(
                f"SyncBatchNorm: expected {name} to be on the same device as input "
                f"({input.device}), but got {t.device}")


def _local_moments(input: Tensor, C: int) -> Tensor:
    """[count, mean (C), M2 (C)] of this rank, float64."""
    count = input.numel() // C
    packed = torch.zeros(2 * C + 1, dtype=torch.float64, device=input.device)
    packed[0] = count
    if count > 0:
        mean, var = ops.batch_norm_stats(input)
        packed[1:C + 1] = mean
        packed[C + 1:] = var.double() * count
    return packed


def _gather(packed: Tensor, process_group, size: int) -> Tensor:
    rows = [torch.empty_like(packed) for _ in range(size)]
    dist.all_gather(rows, packed, group=process_group)
    return torch.stack(rows)


def _merge(rows: Tensor, C: int):
    """Chan's merge of the ranks' (count, mean, M2) rows: the global count,
    mean and biased variance. Ranks with count 0 weigh nothing."""
    counts = rows[:, :1]
    total = counts.sum()
    weights = counts / total.clamp_min(1)
    mean = (weights * rows[:, 1:C + 1]).sum(0)
    m2 = rows[:, C + 1:].sum(0) + (counts * (rows[:, 1:C + 1] - mean) ** 2).sum(0)
    return total, mean, m2 / total.clamp_min(1)


def _global_moments(input: Tensor, weight, bias, running_mean, running_var, num_features: int,
                    process_group, size: int):
    """The global count, mean and biased variance (float64) of every channel.
    One all_gather; a rank whose arguments are invalid marks its row and
    raises after the collective, and so does every other rank."""
    C = num_features
    try:
        _check_args(input, weight, bias, running_mean, running_var, C)
        packed = _local_moments(input, C)
    except Exception:
        failed = torch.zeros(2 * C + 1, dtype=torch.float64, device=input.device)
        failed[0] = _FAILED
        _gather(failed, process_group, size)
        raise
    rows = _gather(packed, process_group, size)
    failed_ranks = (rows[:, 0] == _FAILED).nonzero().flatten().tolist()
    if failed_ranks:
        raise RuntimeError(
            f"SyncBatchNorm: the forward failed on rank(s) {failed_ranks} of the process group "
            "(see the error raised there)")
    total, mean, var = _merge(rows, C)
    return int(total.item()), mean, var


class _SyncBatchNormElemt(torch.autograd.Function):
    """The normalisation with given global statistics; its backward reduces
    the gradient sums over the process group."""

    @staticmethod
    def forward(ctx, input, weight, bias, mean, var, total, eps, activation, process_group):
        out = (ops.batch_norm_elemt(input, weight, bias, mean, var, eps, activation)
               if input.numel() > 0 else torch.empty_like(input))
        ctx.save_for_backward(input, weight, bias, mean, var)
        ctx.total, ctx.eps, ctx.activation, ctx.process_group = total, eps, activation, process_group
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        input, weight, bias, mean, var = ctx.saved_tensors
        C = mean.numel()
        if input.numel() > 0:
            sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(
                grad_out, input, mean, var, weight, bias, ctx.eps, ctx.activation)
        else:
            sum_dy = sum_dy_xmu = torch.zeros_like(mean)
        # Every rank joins the all_reduce, whatever gradients it needs.
        sums = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(sums, group=ctx.process_group)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = (ops.batch_norm_backward_elemt(
                grad_out, input, mean, var, weight, bias, sums[:C] / ctx.total,
                sums[C:] / ctx.total, ctx.eps, ctx.activation)
                if input.numel() > 0 else torch.zeros_like(input))
        if ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * torch.rsqrt(var + ctx.eps)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(bias.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float,
                    activation: int, num_features: int, process_group) -> Tensor:
    """Training-mode batch norm (+ activation code) over the whole process
    group. The running statistics, if given, move towards the global mean
    and unbiased variance once the normalisation has succeeded."""
    size = world_size(process_group)
    with torch.no_grad():
        total, mean, var = _global_moments(input, weight, bias, running_mean, running_var,
                                           num_features, process_group, size)
    if total == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got 1 value per channel over "
            "the whole process group")
    acc = acc_dtype(input.dtype)
    out = _SyncBatchNormElemt.apply(input, weight, bias, mean.to(acc), var.to(acc), total, eps,
                                    activation, process_group)
    update_running_stats(running_mean, running_var, mean, var, total, momentum)
    return out
