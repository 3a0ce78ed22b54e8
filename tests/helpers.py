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


def check_half_conversions(dtype, layout):
    """The CPU kernels widen and round 16-bit values themselves (F16C for
    float16 in the AVX2 and AVX-512 builds, integer arithmetic otherwise):
    every bit pattern must widen exactly, and float results must round as
    torch does (nearest even, overflow to inf, subnormals, NaN). Batch norm's
    affine step (plain and with ReLU6), its input gradient (dy every pattern;
    and, with ReLU6, the mask at every stored pre-activation) and its
    gradient sums under that mask, for the span (NCHW planes) and the row
    (channels_last) kernels: 24 channels, a whole vector and a tail of a
    row in every build."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    scales = [1.0, 0.7, 3.1e-3, 2.0 ** -20, 1.7e-7, 11.0, 65504.0 / 3, 1.3e30,
              0.5, 1.5, 2.0 ** -10, 1e-3, 0.33, 7.7, 100.0, 1e4,
              2.0 ** -24, 0.9999, 1.0001, 3.0, 0.1, 5e-5, 2.5e-2, 600.0]
    C = len(scales)
    shape = (1, C, *([1] * (1 if layout == "planes" else 2)))

    def spread(t):  # every pattern in each channel of 2 samples
        t = t.reshape(1, 1, -1).expand(2, C, -1).contiguous()  # planes: the span kernels
        if layout == "rows":  # channels_last rows: the row kernels
            t = t.reshape(2, C, 256, 256).contiguous(memory_format=torch.channels_last)
        return t

    x = spread(every)
    finite = spread(torch.where(torch.isfinite(every), every, torch.zeros_like(every)))
    # Unit variance (invstd exactly 1), so the weight is the float scale used.
    eps = 0.25
    weight = torch.tensor(scales, dtype=torch.float32)
    w = weight.view(shape)
    zeros, var = torch.zeros(C), torch.full((C,), 0.75)
    ops = torch.ops.normops
    ref = (x.float() * w).to(dtype)
    results = [
        (ops.batch_norm_elemt(x, weight, None, zeros, var, eps, 0), ref),
        (ops.batch_norm_elemt(x, weight, None, zeros, var, eps, 2), torch.nn.functional.relu6(ref)),
        # With zero input and zero mean gradients, dx = invstd * weight * dy.
        (ops.batch_norm_backward_elemt(x, torch.zeros_like(x), zeros, var, weight, None, zeros,
                                       zeros, eps, 0), ref),
    ]
    # dy = 1 through the ReLU6 mask at the stored pre-activation
    # z = (x * weight) rounded to dtype: dx = weight where 0 < z < 6.
    z = (finite.float() * w).to(dtype)
    passes = (z > 0) & (z < 6)
    ones = torch.ones_like(finite)
    results.append((ops.batch_norm_backward_elemt(ones, finite, zeros, var, weight, None, zeros,
                                                  zeros, eps, 2),
                    torch.where(passes, w, 0.0).to(dtype)))
    for got, expected in results:
        # -0 * s + 0 is +0 in the kernels; torch's product keeps -0.
        same_bits = got.view(torch.int16) == expected.view(torch.int16)
        both_nan = torch.isnan(got) & torch.isnan(expected)
        both_zero = (got == 0) & (expected == 0)
        ok = same_bits | both_nan | both_zero
        assert bool(ok.all()), int((~ok).sum())
    sum_dy, _ = ops.batch_norm_backward_reduce(ones, finite, zeros, var, weight, None, eps, 2)
    assert torch.equal(sum_dy, passes.sum(dim=[0, *range(2, passes.dim())]).float())
