"""torch.library.opcheck on every normops op: schema honesty, fake kernels
(shapes, dtypes, strides), autograd registration and AOT dispatch."""
import pytest
import torch

import normops  # noqa: F401
from helpers import devices, make_input

ops = torch.ops.normops


def bn_samples(device):
    for layout in ("contiguous", "channels_last", "strided"):
        for dtype, pdt in ((torch.float32, torch.float32), (torch.float64, torch.float64),
                           (torch.bfloat16, torch.float32)):
            x = make_input((3, 4, 5, 6), dtype, device, layout)
            w = torch.rand(4, dtype=pdt, device=device) + 0.5
            b = torch.randn(4, dtype=pdt, device=device)
            yield x, w, b
    yield make_input((6, 4), torch.float32, device), None, None


def with_grad(*ts):
    return [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point()
            else t for t in ts]


@devices
def test_opcheck_batch_norm(device):
    for x, w, b in bn_samples(device):
        rm = torch.zeros(4 if x.dim() > 2 else 4, device=device, dtype=w.dtype if w is not None else x.dtype)
        rv = torch.ones_like(rm)
        for act in (0, 1, 2):
            for training in (True, False):
                torch.library.opcheck(ops.batch_norm, (x, w, b, rm, rv, training, 1e-5, act))
                xg, wg, bg = with_grad(x, w, b)
                torch.library.opcheck(ops.batch_norm, (xg, wg, bg, rm, rv, training, 1e-5, act))
            mean, var = ops.batch_norm_stats(x)
            g = torch.randn_like(x)
            torch.library.opcheck(ops.batch_norm_stats, (x,))
            torch.library.opcheck(ops.batch_norm_elemt, (x, w, b, mean, var, 1e-5, act))
            torch.library.opcheck(ops.batch_norm_backward_reduce,
                                  (g, x, mean, var, w, b, 1e-5, act))
            torch.library.opcheck(ops.batch_norm_backward_elemt,
                                  (g, x, mean, var, w, b, mean, var, 1e-5, act))
            for mask in ([True, True, True], [True, False, False], [False, True, True]):
                torch.library.opcheck(ops.batch_norm_backward,
                                      (g, x, w, b, mean, var, True, 1e-5, act, mask))


@devices
def test_opcheck_layer_norm(device):
    for dtype, pdt in ((torch.float32, torch.float32), (torch.float64, torch.float64),
                       (torch.bfloat16, torch.float32), (torch.float16, torch.float16)):
        x = torch.randn(3, 5, 8, device=device).to(dtype)
        for w, b in ((torch.randn(5, 8, device=device).to(pdt), torch.randn(5, 8, device=device).to(pdt)),
                     (torch.randn(5, 8, device=device).to(pdt), None), (None, None)):
            torch.library.opcheck(ops.layer_norm, (x, [5, 8], w, b, 1e-5))
            xg, wg, bg = with_grad(x, w, b)
            torch.library.opcheck(ops.layer_norm, (xg, [5, 8], wg, bg, 1e-5))
            _, mean, rstd = ops.layer_norm(x, [5, 8], w, b, 1e-5)
            g = torch.randn_like(x)
            for mask in ([True, True, True], [False, True, False], [True, False, False]):
                torch.library.opcheck(ops.layer_norm_backward,
                                      (g, x, [5, 8], mean, rstd, w, b, mask))


@devices
def test_opcheck_group_norm(device):
    for layout in ("contiguous", "channels_last", "strided"):
        for dtype, pdt in ((torch.float32, torch.float32), (torch.float64, torch.float64),
                           (torch.bfloat16, torch.float32)):
            x = make_input((2, 6, 4, 5), dtype, device, layout)
            for groups in (1, 3, 6):
                for w, b in ((torch.rand(6, dtype=pdt, device=device), torch.randn(6, dtype=pdt, device=device)),
                             (None, None)):
                    torch.library.opcheck(ops.group_norm, (x, groups, w, b, 1e-5))
                    xg, wg, bg = with_grad(x, w, b)
                    torch.library.opcheck(ops.group_norm, (xg, groups, wg, bg, 1e-5))
                    _, mean, rstd = ops.group_norm(x, groups, w, b, 1e-5)
                    g = torch.randn_like(x)
                    torch.library.opcheck(ops.group_norm_backward,
                                          (g, x, groups, mean, rstd, w, [True, True, True]))


@devices
def test_opcheck_update_running_stats(device):
    mean, var = torch.randn(5, device=device), torch.rand(5, device=device)
    for running in ((torch.randn(5, device=device), torch.rand(5, device=device) + 0.5),
                    (None, torch.rand(5, device=device, dtype=torch.float64)),
                    (torch.randn(5, device=device, dtype=torch.bfloat16), None)):
        torch.library.opcheck(ops.update_running_stats, (*running, mean, var, 0.1, 7))
