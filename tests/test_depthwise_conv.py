"""The depthwise 3x3 convolution ops (the inverted residual's training path,
CPU) against torch's convolution: outputs and both gradients in every layout,
stride 1 and 2, odd and one-pixel sizes, with and without an input norm;
gradcheck, opcheck, torch.compile, bad input."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import normops  # noqa: F401
from helpers import GRAD_TOL, LAYOUTS, TOL, make_input
from normops.ops.batch_norm import apply_activation

ops = torch.ops.normops

# Channels_last runs by vectors of channels up to 128 bytes of channels (32
# floats; the input gradient at stride 2 excepted) and above ~227 float
# channels, pixel by pixel between (csrc/cpu/kernels/kernels_impl.h,
# channel_order): 3-24 channels and 245 (with a tail of channels; float64
# from ~114 channels: 120) take the first, 33 the second; 70 columns two
# column blocks, and 1-2 rows or columns the edges.
SHAPES = [(2, 3, 5, 7), (1, 17, 1, 1), (3, 16, 8, 8), (2, 33, 9, 4), (1, 5, 2, 3),
          (2, 24, 13, 11), (1, 1, 6, 1), (2, 245, 5, 7), (1, 245, 3, 70), (1, 245, 1, 2),
          (2, 120, 2, 1)]


def reference(x, w, stride, g):
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    y = F.conv2d(x64, w64, None, stride, 1, 1, w.size(0))
    dx, dw = torch.autograd.grad(y, (x64, w64), g.double())
    return y, dx, dw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_matches_torch(dtype, layout, stride):
    torch.manual_seed(0)
    for shape in SHAPES:
        x = make_input(shape, dtype, "cpu", layout)
        w = torch.randn(shape[1], 1, 3, 3, dtype=dtype)
        y = ops.depthwise_conv3x3(x, w, stride)
        g = torch.randn_like(y)
        ry, rdx, rdw = reference(x, w, stride, g)
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(y.double(), ry, rtol=rtol, atol=atol)
        dx, dw = ops.depthwise_conv3x3_backward(g, x, w, stride, [True, True])
        rtol, atol = GRAD_TOL[dtype]
        torch.testing.assert_close(dx.double(), rdx, rtol=rtol, atol=atol)
        torch.testing.assert_close(dw.double(), rdw, rtol=rtol, atol=atol)
        # The output keeps channels_last, as torch's convolution does.
        assert y.is_contiguous(memory_format=torch.channels_last) == (
            F.conv2d(x, w, None, stride, 1, 1, shape[1])
            .is_contiguous(memory_format=torch.channels_last))


def test_grad_layouts_and_masks():
    """A gradient in another layout than the input, and partial masks."""
    x = make_input((2, 8, 6, 5), torch.float64, "cpu", "channels_last")
    w = torch.randn(8, 1, 3, 3, dtype=torch.float64)
    g = torch.randn(2, 8, 6, 5, dtype=torch.float64)  # NCHW
    _, rdx, rdw = reference(x, w, 1, g)
    dx, dw = ops.depthwise_conv3x3_backward(g, x, w, 1, [True, False])
    torch.testing.assert_close(dx, rdx)
    assert dw.numel() == 0
    dx, dw = ops.depthwise_conv3x3_backward(g, x, w, 1, [False, True])
    torch.testing.assert_close(dw, rdw)
    assert dx.numel() == 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_backward_tasks(layout, stride):
    """The backward at 2 threads on images large enough for two tasks, which
    then split an image (channels_last: the input gradient's rows go with
    the output rows that read them last), with every mask."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        for shape in [(1, 64, 64, 64), (3, 64, 41, 61)]:
            x = make_input(shape, torch.float64, "cpu", layout)
            w = torch.randn(shape[1], 1, 3, 3, dtype=torch.float64)
            g = torch.randn_like(ops.depthwise_conv3x3(x, w, stride))
            _, rdx, rdw = reference(x, w, stride, g)
            dx, dw = ops.depthwise_conv3x3_backward(g, x, w, stride, [True, True])
            torch.testing.assert_close(dx, rdx)
            torch.testing.assert_close(dw, rdw)
            torch.testing.assert_close(
                ops.depthwise_conv3x3_backward(g, x, w, stride, [True, False])[0], rdx)
            torch.testing.assert_close(
                ops.depthwise_conv3x3_backward(g, x, w, stride, [False, True])[1], rdw)
    finally:
        torch.set_num_threads(threads)


def test_empty_batch():
    x = torch.randn(0, 4, 5, 5)
    w = torch.randn(4, 1, 3, 3)
    y = ops.depthwise_conv3x3(x, w, 2)
    assert y.shape == (0, 4, 3, 3) == F.conv2d(x, w, None, 2, 1, 1, 4).shape
    dx, dw = ops.depthwise_conv3x3_backward(torch.randn(0, 4, 3, 3), x, w, 2, [True, True])
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))


@pytest.mark.parametrize("stride,layout", list(itertools.product([1, 2], ["contiguous", "channels_last"])))
def test_gradcheck(stride, layout):
    x = make_input((2, 3, 5, 4), torch.float64, "cpu", layout).requires_grad_()
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: ops.depthwise_conv3x3(x, w, stride), (x, w))
    assert torch.autograd.gradgradcheck(lambda x, w: ops.depthwise_conv3x3(x, w, stride), (x, w))


def test_opcheck():
    # (1, 1) spatial: both layouts are one memory, and the output is contiguous.
    for layout, stride, (H, W) in itertools.product(LAYOUTS, (1, 2), ((7, 6), (1, 1))):
        for dtype in (torch.float32, torch.float64):
            x = make_input((2, 5, H, W), dtype, "cpu", layout)
            w = torch.randn(5, 1, 3, 3, dtype=dtype)
            torch.library.opcheck(ops.depthwise_conv3x3, (x, w, stride))
            torch.library.opcheck(ops.depthwise_conv3x3,
                                  (x.clone().requires_grad_(), w.clone().requires_grad_(), stride))
            g = torch.randn(2, 5, (H - 1) // stride + 1, (W - 1) // stride + 1, dtype=dtype)
            for mask in ([True, True], [True, False], [False, True]):
                torch.library.opcheck(ops.depthwise_conv3x3_backward, (g, x, w, stride, mask))


def test_compile_fullgraph():
    x = torch.randn(2, 6, 7, 7, requires_grad=True)
    w = torch.randn(6, 1, 3, 3, requires_grad=True)
    f = torch.compile(lambda x, w: ops.depthwise_conv3x3(x, w, 2).sum(), fullgraph=True)
    f(x, w).backward()
    ref_x, ref_w = (t.detach().clone().requires_grad_() for t in (x, w))
    F.conv2d(ref_x, ref_w, None, 2, 1, 1, 6).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 3, 4), torch.randn(3, 1, 3, 3), 1), "4-D"),
    ((torch.randn(2, 3, 4, 4), torch.randn(4, 1, 3, 3), 1), "weight of shape"),
    ((torch.randn(2, 3, 4, 4), torch.randn(3, 1, 3, 3, dtype=torch.float64), 1), "dtype"),
    ((torch.randn(2, 3, 4, 4).half(), torch.randn(3, 1, 3, 3).half(), 1), "float32 or float64"),
    ((torch.randn(2, 3, 4, 4), torch.randn(3, 1, 3, 3), 3), "stride"),
    ((torch.randn(1, 4, 0, 5), torch.randn(4, 1, 3, 3), 2), "non-empty"),
    ((torch.randn(1, 4, 5, 0), torch.randn(4, 1, 3, 3), 1), "non-empty"),
    ((torch.randn(1, 0, 5, 5), torch.randn(0, 1, 3, 3), 1), "non-empty"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_input(args, match, device):
    """The kernel and the fake kernel refuse alike (an empty spatial dim,
    which torch's convolution refuses too, left output unwritten)."""
    x, w, stride = args
    with pytest.raises(RuntimeError, match=match):
        ops.depthwise_conv3x3(x.to(device), w.to(device), stride)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_backward_checks_grad_output(device):
    x, w = torch.randn(2, 3, 4, 4, device=device), torch.randn(3, 1, 3, 3, device=device)
    with pytest.raises(RuntimeError, match="grad_output of shape"):
        ops.depthwise_conv3x3_backward(torch.randn(5, 7, device=device), x, w, 1, [True, True])
    with pytest.raises(RuntimeError, match="grad_output"):
        ops.depthwise_conv3x3_backward(torch.randn(2, 3, 4, 4, dtype=torch.float64,
                                                   device=device), x, w, 1, [True, True])


def norm_args(C, dtype, affine=True):
    """An input norm (mean, var, weight, bias): statistics in the
    accumulation dtype, as batch_norm_stats returns them."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, var = torch.randn(C, dtype=acc), torch.rand(C, dtype=acc) + 0.5
    if not affine:
        return mean, var, None, None
    return mean, var, torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)


def normalised(x, norm, eps, act):
    mean, var, weight, bias = norm
    return apply_activation(F.batch_norm(x.double(), mean.double(), var.double(),
                                         None if weight is None else weight.double(),
                                         None if bias is None else bias.double(), False, 0.0, eps),
                            act)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_input_norm_matches_torch(dtype, layout, stride):
    """The convolution of act(batch_norm(x)): the output, the gradient at the
    normalised input and the weight gradient, each activation, with and
    without the norm's affine parameters."""
    torch.manual_seed(0)
    for shape, act, affine in zip(SHAPES, itertools.cycle((0, 1, 2)), itertools.cycle((True, False))):
        x = make_input(shape, dtype, "cpu", layout) * 3 + 1  # ReLU6 clips on both sides
        w = torch.randn(shape[1], 1, 3, 3, dtype=dtype)
        norm = norm_args(shape[1], dtype, affine)
        y = ops.depthwise_conv3x3(x, w, stride, *norm, 1e-3, act)
        g = torch.randn_like(y)
        ry, rda, rdw = reference(normalised(x, norm, 1e-3, act), w, stride, g)
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(y.double(), ry, rtol=rtol, atol=atol)
        da, dw = ops.depthwise_conv3x3_backward(g, x, w, stride, [True, True], *norm, 1e-3, act)
        rtol, atol = GRAD_TOL[dtype]
        torch.testing.assert_close(da.double(), rda, rtol=rtol, atol=atol)
        torch.testing.assert_close(dw.double(), rdw, rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_input_norm_gradcheck(layout):
    """Autograd through the input norm (its statistics and parameters too)."""
    x = make_input((2, 3, 5, 4), torch.float64, "cpu", layout).requires_grad_()
    w, *norm = (t.requires_grad_() for t in (torch.randn(3, 1, 3, 3, dtype=torch.float64),
                                            *norm_args(3, torch.float64)))

    def f(x, w, *norm):
        return ops.depthwise_conv3x3(x, w, 2, *norm, 1e-5, 1)

    assert torch.autograd.gradcheck(f, (x, w, *norm))
    assert torch.autograd.gradgradcheck(f, (x, w, *norm))


def test_input_norm_opcheck():
    for layout, dtype in itertools.product(LAYOUTS, (torch.float32, torch.float64)):
        x = make_input((2, 5, 7, 6), dtype, "cpu", layout)
        w = torch.randn(5, 1, 3, 3, dtype=dtype)
        norm = norm_args(5, dtype)
        torch.library.opcheck(ops.depthwise_conv3x3, (x, w, 1, *norm, 1e-5, 2))
        g = torch.randn(2, 5, 4, 3, dtype=dtype)
        torch.library.opcheck(ops.depthwise_conv3x3_backward,
                              (g, x, w, 2, [True, True], *norm, 1e-5, 2))


_C = 3
_STATS = torch.randn(_C), torch.rand(_C) + 1


@pytest.mark.parametrize("norm,match", [
    ((_STATS[0], None, None, None, 0.0, 0), "both norm_mean and norm_var"),
    ((None, None, torch.randn(_C), None, 0.0, 0), "need norm_mean and norm_var"),
    ((torch.randn(_C + 1), _STATS[1], None, None, 0.0, 0), "norm_mean to be a floating point"),
    ((*_STATS, torch.randn(_C, dtype=torch.float64), None, 0.0, 0), "norm_weight"),
    ((*_STATS, None, torch.randn(2, _C), 0.0, 0), "norm_bias"),
    ((*_STATS, None, None, 0.0, 3), "activation"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_input_norm(norm, match, device):
    x, w = torch.randn(2, _C, 4, 4, device=device), torch.randn(_C, 1, 3, 3, device=device)
    norm = [t.to(device) if isinstance(t, torch.Tensor) else t for t in norm]
    with pytest.raises(RuntimeError, match=match):
        ops.depthwise_conv3x3(x, w, 1, *norm)
    with pytest.raises(RuntimeError, match=match):
        ops.depthwise_conv3x3_backward(torch.randn(2, _C, 4, 4, device=device), x, w, 1,
                                       [True, True], *norm)
