"""Group norm against torch.nn.GroupNorm / F.group_norm."""
import pytest
import torch
import torch.nn.functional as TF

import normops
import normops.functional as NF
from helpers import LAYOUTS, assert_close, assert_grads_close, devices, make_input

CASES = [((2, 6, 5, 5), 3), ((1, 4, 7), 2), ((3, 8, 2, 3, 4), 4), ((2, 6, 1, 1), 2),
         ((4, 32, 6, 6), 32), ((2, 64, 3, 5), 1), ((1, 12, 9), 12), ((33, 96, 1, 1), 32)]


@devices
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_parity(device, dtype, layout, shape, groups, affine):
    x = make_input(shape, dtype, device, layout, scale=2.0, offset=0.3).requires_grad_()
    C = shape[1]
    w = (torch.rand(C, dtype=dtype, device=device) + 0.5).requires_grad_() if affine else None
    b = torch.randn(C, dtype=dtype, device=device).requires_grad_() if affine else None
    inputs = [t for t in (x, w, b) if t is not None]
    y = NF.group_norm(x, groups, w, b, 1e-5)
    yr = TF.group_norm(x, groups, w, b, 1e-5)
    assert_close(y, yr)
    if layout == "channels_last" and x.dim() >= 4:
        assert y.stride() == x.stride()  # channels_last(_3d) is kept
    elif layout != "contiguous":
        assert y.is_contiguous()  # as torch: a transposed 3-D input gives contiguous output
    assert_grads_close(y, yr, inputs)


@devices
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 8, 6, 5), (9, 8, 1, 1)])
def test_group_norm_reduced_precision_mixed(device, dtype, layout, shape):
    x = make_input(shape, dtype, device, layout).requires_grad_()
    w = torch.rand(8, device=device).add_(0.5).requires_grad_()
    b = torch.randn(8, device=device).requires_grad_()
    y = NF.group_norm(x, 4, w, b)
    assert y.dtype == dtype
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = TF.group_norm(xr, 4, wr, br)
    assert_close(y, yr, dtype)
    g = torch.randn_like(yr)
    gx, gw, _ = torch.autograd.grad(y, (x, w, b), g.to(dtype))
    ex, ew, _ = torch.autograd.grad(yr, (xr, wr, br), g)
    assert gw.dtype == torch.float32
    assert_close(gx, ex, dtype, grad=True)
    assert_close(gw, ew, dtype, grad=True, rtol=2e-2, atol=0.2)


def test_group_norm_module_and_errors():
    ref = torch.nn.GroupNorm(2, 4)
    ours = normops.nn.GroupNorm(2, 4)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 5)
    assert_close(ours(x), ref(x))
    with pytest.raises(ValueError, match=r"num_channels \(4\) must be divisible by num_groups \(3\)"):
        normops.nn.GroupNorm(3, 4)
    with pytest.raises(RuntimeError, match="Expected at least 2 dimensions"):
        NF.group_norm(torch.randn(4), 2)
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        NF.group_norm(torch.randn(2, 5, 3), 2)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        normops.nn.GroupNorm(4, 4)(torch.randn(1, 4, 1, 1))
    with pytest.raises(RuntimeError, match="weight of shape"):
        NF.group_norm(torch.randn(2, 4, 3), 2, torch.ones(5))


def test_group_norm_channels_last_large_mean_many_blocks():
    """A sample of 128 row blocks of 1e4 + N(0, 1), reduced by sample: the
    output is off by the float32 mean's rounding alone (up to 5e-4), not by
    drift in merging the blocks at 1e4's scale (3.7e-3 before)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 16, 128, 128, dtype=torch.float64, generator=g) + 1e4).float()
    x = x.contiguous(memory_format=torch.channels_last)
    ref = TF.group_norm(x.double(), 8)
    torch.testing.assert_close(NF.group_norm(x, 8).double(), ref, rtol=0, atol=1.5e-3)


def test_group_norm_large_mean_and_zero_batch():
    # Long groups, and groups of 12 values (one short run: span_moments' fast path).
    for shape, groups in (((2, 8, 16, 16), 2), ((4, 8, 2, 3), 4)):
        for layout in ("contiguous", "channels_last"):
            x = make_input(shape, torch.float32, layout=layout, offset=1e4)
            ref = TF.group_norm(x.double(), groups)
            torch.testing.assert_close(NF.group_norm(x, groups).double(), ref, rtol=0, atol=2e-3)
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    y = NF.group_norm(x, 2)
    assert y.shape == x.shape
    y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,groups,layout", [
    ((3, 8, 5, 7), 4, "contiguous"),      # fused by (n, group)
    ((5, 12, 1, 1), 4, "contiguous"),     # by group, planes of one value
    ((5, 12, 4, 3), 4, "channels_last"),  # fused by sample
    ((1, 12, 4, 3), 4, "channels_last"),  # fused by sample: one thread's work
    ((2, 48, 40, 30), 4, "channels_last"),  # fused by sample: a small sample per thread
    ((1, 48, 40, 30), 4, "channels_last"),  # through the drivers: one sample
    ((3, 12, 100, 90), 4, "channels_last"),  # through the drivers: too few samples
    ((1, 12, 4, 3), 1, "contiguous"),     # through the drivers: one group
])
def test_group_norm_cpu_paths(dtype, shape, groups, layout):
    """Each CPU path, chosen by layout and by the work per thread, at 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = make_input(shape, dtype, layout=layout, scale=2.0, offset=0.3).requires_grad_()
        w = torch.rand(shape[1], dtype=torch.float64).add_(0.5).to(x.dtype).requires_grad_()
        b = torch.randn(shape[1], dtype=torch.float64).to(x.dtype).requires_grad_()
        y = NF.group_norm(x, groups, w, b)
        xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
        yr = TF.group_norm(xr, groups, wr, br)
        assert_close(y, yr, dtype)
        g = torch.randn_like(y)  # the reference gets the same (rounded) values
        for a, e in zip(torch.autograd.grad(y, (x, w, b), g),
                        torch.autograd.grad(yr, (xr, wr, br), g.double())):
            assert_close(a, e, dtype, grad=True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("offset,atol", [(300.0, 2e-6), (-5.0, 2e-6), (5.0, 2e-6)])
def test_group_norm_affine_step_centred_far_from_zero(offset, atol):
    """Channels_last by sample: the affine step reads x * scale + shift only
    for groups within a few standard deviations of zero; at 300 the folded
    shift would round at 300's scale (about 2e-5). The values are offset +
    k / 1024 with every channel's k summing to zero, so the statistics are
    exact and the affine step's rounding is all that is left."""
    N, C, H, W, G = 4, 8, 3, 6, 2
    k = torch.randint(-2048, 2048, (N, C, H, W // 2), dtype=torch.float64) / 1024
    x = (torch.cat([k, -k], dim=3) + offset).float().contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(C) + 0.5, torch.rand(C) - 0.5
    ref = TF.group_norm(x.double(), G, w.double(), b.double())
    torch.testing.assert_close(NF.group_norm(x, G, w, b).double(), ref, rtol=0, atol=atol)
