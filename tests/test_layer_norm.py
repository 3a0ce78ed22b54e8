"""Layer norm against torch.nn.LayerNorm / F.layer_norm."""
import pytest
import torch
import torch.nn.functional as TF

import normops
import normops.functional as NF
from helpers import assert_close, assert_grads_close, devices

CASES = [((4, 7), (7,)), ((3, 5, 16), (16,)), ((2, 3, 4, 5), (4, 5)), ((1, 1), (1,)),
         ((6, 1023), (1023,)), ((2, 1500), (1500,)), ((9000, 3), (3,)), ((5,), (5,))]


@devices
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,nshape", CASES)
@pytest.mark.parametrize("affine", ["both", "weight_only", "bias_only", "none"])
def test_layer_norm_parity(device, dtype, shape, nshape, affine):
    x = torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5
    w = torch.randn(nshape, dtype=dtype, device=device) if affine in ("both", "weight_only") else None
    b = torch.randn(nshape, dtype=dtype, device=device) if affine in ("both", "bias_only") else None
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = NF.layer_norm(x, nshape, w, b, 1e-5)
    yr = TF.layer_norm(x, nshape, w, b, 1e-5)
    assert_close(y, yr)
    assert y.is_contiguous()
    assert_grads_close(y, yr, inputs)


@devices
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", ["same", "float32"])
def test_layer_norm_reduced_precision(device, dtype, param_dtype):
    pdt = dtype if param_dtype == "same" else torch.float32
    x = torch.randn(64, 256, device=device).to(dtype).requires_grad_()
    w = torch.randn(256, device=device).to(pdt).requires_grad_()
    b = torch.randn(256, device=device).to(pdt).requires_grad_()
    y = NF.layer_norm(x, (256,), w, b)
    assert y.dtype == dtype
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = TF.layer_norm(xr, (256,), wr, br)
    assert_close(y, yr, dtype)
    g = torch.randn_like(yr)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g.to(dtype))
    ex, ew, eb = torch.autograd.grad(yr, (xr, wr, br), g)
    assert gw.dtype == pdt
    assert_close(gx, ex, dtype, grad=True)
    assert_close(gb, eb, dtype, grad=True, rtol=2e-2, atol=0.5)
    assert_close(gw, ew, dtype, grad=True, rtol=2e-2, atol=0.5)


def test_layer_norm_non_contiguous_input():
    base = torch.randn(8, 3, 10, dtype=torch.float64)
    x = base.transpose(0, 1)[:, ::2]  # (3, 4, 10), non-contiguous
    w = torch.randn(10, dtype=torch.float64)
    assert_close(NF.layer_norm(x, (10,), w), TF.layer_norm(x, (10,), w))


@pytest.mark.parametrize("kw", [dict(), dict(elementwise_affine=False), dict(bias=False)])
def test_layer_norm_module(kw):
    ref = torch.nn.LayerNorm([4, 6], **kw)
    ours = normops.nn.LayerNorm([4, 6], **kw)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours).replace("normops.nn.", "") == repr(ref).replace("torch.nn.", "")
    x = torch.randn(3, 4, 6)
    assert_close(ours(x), ref(x))
    assert isinstance(normops.nn.LayerNorm(5).normalized_shape, tuple)


@pytest.mark.parametrize("width", [512, 3 * 4096 + 5, 1 << 20])
def test_layer_norm_large_mean(width):
    """Within the float32 rounding of the mean (half an ulp at 1e4, 4.9e-4)
    at any width: wide rows merge hundreds of blocks."""
    torch.manual_seed(0)
    x = torch.randn(2, width, dtype=torch.float64).add_(1e4).float()
    y = NF.layer_norm(x, (width,))
    ref = TF.layer_norm(x.double(), (width,))
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=5e-4)


def test_layer_norm_zero_rows():
    x = torch.randn(0, 3, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    y = NF.layer_norm(x, (8,), w)
    assert y.shape == (0, 3, 8)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(8))


def test_layer_norm_bad_input():
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*, 4\]"):
        NF.layer_norm(torch.randn(3, 5), (4,))
    with pytest.raises(RuntimeError, match="weight of shape"):
        NF.layer_norm(torch.randn(3, 4), (4,), torch.ones(5))
    with pytest.raises(RuntimeError, match="dtype"):
        NF.layer_norm(torch.randn(3, 4), (4,), torch.ones(4, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="floating point"):
        NF.layer_norm(torch.ones(3, 4, dtype=torch.long), (4,))
