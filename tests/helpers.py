"""Shared test helpers: devices, layouts, tolerances."""
import inspect

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
devices = pytest.mark.parametrize("device", DEVICES)

# torch.nn's batch norms take `bias=` from torch 2.12 on (the GPU machine has 2.11).
needs_bn_bias_arg = pytest.mark.skipif(
    "bias" not in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters,
    reason=f"torch {torch.__version__}'s BatchNorm2d has no bias= argument")

# (rtol, atol) of a result against a float64 reference on the same input.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}
# Gradients accumulate more rounding: float32 gets a looser bound.
GRAD_TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (4e-2, 4e-2),
    torch.float16: (1e-2, 1e-2),
}

LAYOUTS = ["contiguous", "channels_last", "strided"]


def make_input(shape, dtype=torch.float32, device="cpu", layout="contiguous", scale=1.0,
               offset=0.0):
    """A random (N, C, *) input in the given layout: contiguous,
    channels_last (channels innermost, any rank >= 3) or strided (a
    non-contiguous slice of a bigger tensor)."""
    if layout == "strided":
        big = list(shape)
        big[-1] = big[-1] * 2 + 1
        x = torch.randn(big, dtype=torch.float64, device=device) * scale + offset
        return x[..., 1::2].to(dtype)
    x = (torch.randn(shape, dtype=torch.float64, device=device) * scale + offset).to(dtype)
    if layout == "channels_last" and x.dim() >= 3:
        perm = [0] + list(range(2, x.dim())) + [1]
        inv = [0, x.dim() - 1] + list(range(1, x.dim() - 1))
        x = x.permute(perm).contiguous().permute(inv)
    return x


def assert_close(actual, expected, dtype=None, grad=False, **kw):
    dtype = dtype or actual.dtype
    rtol, atol = (GRAD_TOL if grad else TOL)[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=kw.get("rtol", rtol),
                               atol=kw.get("atol", atol), equal_nan=True)


def grads(out, inputs, grad_out):
    inputs = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, inputs, grad_out)


def assert_grads_close(y, expected, inputs):
    """Gradients of y and of the reference output `expected` (both built
    from `inputs`) for one random output gradient."""
    g = torch.randn_like(expected)
    for a, e in zip(grads(y, inputs, g), grads(expected, inputs, g)):
        assert_close(a, e, grad=True)


def step_and_compare(ours, ref, x, act=None, steps=2, dtype=None, **tol):
    """Runs both modules `steps` times on x (as a leaf needing grad) and
    compares outputs, input and parameter gradients, and buffers after every
    step (num_batches_tracked exactly). `act` follows `ref` (an unfused
    activation); `tol` (rtol, atol) replaces the dtype's tolerances."""
    for _ in range(steps):
        xo = x.detach().clone().requires_grad_()
        xr = x.detach().clone().requires_grad_()
        yo = ours(xo)
        yr = ref(xr)
        if act is not None:
            yr = act(yr)
        assert_close(yo, yr, dtype, **tol)
        assert yo.dtype == yr.dtype and yo.shape == yr.shape
        g = torch.randn_like(yr)
        yo.backward(g)
        yr.backward(g)
        assert_close(xo.grad, xr.grad, dtype, grad=True, **tol)
        for (name, po), pr in zip(ours.named_parameters(), ref.parameters()):
            assert po.grad is not None, name
            assert_close(po.grad, pr.grad, dtype, grad=True, **tol)
        for bo, br in zip(ours.buffers(), ref.buffers()):
            if bo.is_floating_point():
                assert_close(bo, br, dtype, **tol)
            else:
                assert torch.equal(bo, br)
