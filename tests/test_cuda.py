"""CUDA-specific cases (skipped without a GPU): large half-precision inputs,
the inverted residual's CUDA training path,
channels_last, a non-default stream, CUDA graphs through
torch.compile(mode="reduce-overhead"), more rows than a grid dimension
holds, misaligned storage (no 16-byte accesses), more than 2^31 elements
(64-bit indexing), and CPU vs CUDA agreement."""
import pytest
import torch
import torch.nn.functional as TF

import normops
import normops.functional as NF
from helpers import assert_close, make_input

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODULES = [
    (lambda: normops.nn.BatchNorm2d(64), (32, 64, 28, 28)),
    (lambda: normops.nn.BatchNormAct2d(64, activation="relu6"), (32, 64, 28, 28)),
    (lambda: normops.nn.GroupNorm(32, 64), (8, 64, 28, 28)),
    (lambda: normops.nn.InstanceNorm2d(64, affine=True), (4, 64, 64, 64)),
    (lambda: normops.nn.LayerNorm(1024), (4096, 1024)),
]


@pytest.mark.parametrize("make,shape", MODULES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_and_cuda_agree(make, shape, layout):
    cpu = make().double()
    gpu = make().double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = make_input(shape, torch.float64, "cpu", layout if len(shape) == 4 else "contiguous")
    xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
    yc, yg = cpu(xc), gpu(xg)
    assert_close(yg.cpu(), yc)
    g = torch.randn_like(yc)
    yc.backward(g), yg.backward(g.cuda())
    assert_close(xg.grad.cpu(), xc.grad, grad=True)
    for bc, bg in zip(cpu.buffers(), gpu.buffers()):
        assert torch.allclose(bc.double(), bg.cpu().double(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make,shape", MODULES)
def test_half_precision_large(make, shape, dtype):
    m = make().cuda()
    ref = make().double().cuda()
    ref.load_state_dict(m.state_dict())
    x = make_input(shape, dtype, "cuda", "channels_last" if len(shape) == 4 else "contiguous")
    xo, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    yo, yr = m(xo), ref(xr)
    assert yo.dtype == dtype
    assert_close(yo, yr, dtype)
    g = torch.randn_like(yr)
    yo.backward(g.to(dtype)), yr.backward(g)
    assert_close(xo.grad, xr.grad, dtype, grad=True)


def test_non_default_stream():
    m = normops.nn.GroupNorm(4, 16).cuda()
    x = torch.randn(8, 16, 32, 32, device="cuda")
    expected = m(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = m(x)
    torch.cuda.current_stream().wait_stream(s)
    assert_close(got, expected)


def test_cuda_graphs_through_reduce_overhead():
    torch._dynamo.reset()
    m = torch.nn.Sequential(normops.nn.BatchNormAct2d(8, activation="relu"),
                            normops.nn.GroupNorm(2, 8)).cuda().eval()
    compiled = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        x = torch.randn(4, 8, 16, 16, device="cuda")
        assert_close(compiled(x).clone(), m(x))


def test_more_rows_than_a_grid_dimension():
    x = torch.randn(70000, 64, device="cuda", requires_grad=True)
    w = torch.randn(64, device="cuda", requires_grad=True)
    y = NF.layer_norm(x, (64,), w)
    assert_close(y, TF.layer_norm(x, (64,), w))
    bn = NF.batch_norm(x, None, None, training=True)
    assert_close(bn, TF.batch_norm(x, None, None, training=True))
    # Group norm on rows (2-D input, channels_last): more samples than the
    # grid's z dimension (65535) holds.
    for xs in (x, torch.randn(65537, 8, 2, 2, device="cuda").to(memory_format=torch.channels_last)):
        xo, xr = xs.detach().clone().requires_grad_(), xs.detach().clone().requires_grad_()
        yo, yr = NF.group_norm(xo, 2), TF.group_norm(xr, 2)
        assert_close(yo, yr)
        g = torch.randn_like(yr)
        yo.backward(g), yr.backward(g)
        assert_close(xo.grad, xr.grad, grad=True)


def misaligned(shape, layout, device="cuda"):
    """A random tensor of `shape` one float64 into its storage (8 bytes past
    the allocation's alignment), contiguous or channels_last."""
    N, C, H, W = shape
    flat = torch.empty(1 + N * C * H * W, device=device, dtype=torch.float64)[1:]
    x = flat.view(N, H, W, C).permute(0, 3, 1, 2) if layout == "channels_last" else flat.view(shape)
    return x.copy_(torch.randn(shape))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_misaligned_storage_takes_the_scalar_path(layout):
    """Input one element into its storage cannot use 16-byte accesses: the
    kernels fall back to one element at a time, with the same result."""
    for ours, ref in ((lambda t: NF.batch_norm(t, None, None, training=True, activation="relu6"),
                       lambda t: TF.relu6(TF.batch_norm(t, None, None, training=True))),
                      (lambda t: NF.group_norm(t, 2), lambda t: TF.group_norm(t, 2)),
                      (lambda t: NF.layer_norm(t, (6,)), lambda t: TF.layer_norm(t, (6,)))):
        xo = misaligned((4, 8, 6, 6), layout).requires_grad_()
        xr = xo.detach().clone().requires_grad_()
        assert xo.data_ptr() % 16 != 0
        yo, yr = ours(xo), ref(xr)
        assert_close(yo, yr)
        g = torch.randn_like(yr)
        yo.backward(g), yr.backward(g)
        assert_close(xo.grad, xr.grad, grad=True)


@pytest.mark.skipif(torch.cuda.is_available()
                    and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs 40 GiB of GPU memory")
def test_more_than_2_31_elements():
    """Past 2^31 elements the elementwise kernels index in 64 bits."""
    C = 4
    x = torch.randn(2**29 + 8, C, device="cuda", dtype=torch.bfloat16)  # 2^31 + 32 elements
    y = NF.batch_norm(x, None, None, training=True)
    ref = TF.batch_norm(x.float(), None, None, training=True)
    for rows in (slice(0, 4096), slice(-4096, None)):
        assert_close(y[rows].float(), ref[rows], torch.bfloat16)


@pytest.mark.parametrize("cfg", [(16, 16, 1, 6), (16, 24, 2, 6), (8, 12, 1, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("memory_efficient", [True, False], ids=["recompute", "keep"])
def test_inverted_residual_on_cuda_matches_torch_nn(cfg, layout, memory_efficient):
    """Training runs normops' batch-norm ops and torch's convolutions on
    CUDA (the recomputing backward by default); eval runs the submodules."""
    import reference_models
    from helpers import step_and_compare
    torch.manual_seed(0)
    ref = reference_models.randomize_norms(reference_models.InvertedResidual(*cfg))
    ours = normops.nn.InvertedResidual(*cfg, memory_efficient=memory_efficient)
    ours.load_state_dict(ref.state_dict())
    ours, ref = ours.double().cuda(), ref.double().cuda()
    x = make_input((3, cfg[0], 9, 7), torch.float64, "cuda", layout)
    step_and_compare(ours, ref, x, steps=2)
    ours.eval(), ref.eval()
    with torch.no_grad():
        assert_close(ours(x), ref(x))


def test_inverted_residual_training_saves_little_on_cuda():
    import reference_models
    cfg = (24, 24, 1, 6)
    ref = reference_models.InvertedResidual(*cfg).cuda()
    ours = normops.nn.InvertedResidual(*cfg).cuda()
    x = torch.randn(4, 24, 28, 28, device="cuda").requires_grad_()
    ours_bytes = reference_models.saved_activation_bytes(ours, x)
    ref_bytes = reference_models.saved_activation_bytes(ref, x)
    assert ours_bytes <= 0.2 * ref_bytes, (ours_bytes, ref_bytes)


def test_extreme_values_on_cuda():
    """The CPU edge cases of the statistics on CUDA: a constant 3e19 (whose
    square overflows float32) has zero variance, and a float64 spread of
    1e110 keeps the input gradient's correction term."""
    x = torch.full((5, 46, 11, 17), 3e19, device="cuda")
    assert not NF.batch_norm(x, None, None, training=True).isnan().any()
    assert not NF.group_norm(x, 2).isnan().any()
    assert not NF.layer_norm(x.reshape(5, -1)[:, :1024], (1024,)).isnan().any()
    torch.manual_seed(0)
    x = (torch.randn(2, 4, 5, 6, dtype=torch.float64, device="cuda") * 1e110)
    g = torch.randn_like(x)
    for ours, theirs in ((lambda t: NF.batch_norm(t, None, None, training=True),
                          lambda t: TF.batch_norm(t, None, None, training=True)),
                         (lambda t: NF.group_norm(t, 2), lambda t: TF.group_norm(t, 2))):
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        do, = torch.autograd.grad(ours(xo), xo, g)
        dt, = torch.autograd.grad(theirs(xt), xt, g)
        torch.testing.assert_close(do, dt, rtol=1e-10, atol=1e-10 * dt.abs().max().item())
