"""Instance norm against torch.nn.InstanceNorm1d/2d/3d and F.instance_norm."""
import warnings

import pytest
import torch
import torch.nn.functional as TF

import normops
import normops.functional as NF
from helpers import (LAYOUTS, assert_close, assert_grads_close, devices, make_input,
                     step_and_compare)

MODULES = [("InstanceNorm1d", (3, 4, 7)), ("InstanceNorm1d", (4, 7)),
           ("InstanceNorm2d", (2, 4, 5, 6)), ("InstanceNorm2d", (4, 5, 6)),
           ("InstanceNorm3d", (2, 3, 3, 4, 5)), ("InstanceNorm2d", (1, 5, 1, 2))]


def pair(cls, C, dtype, **kw):
    ref = getattr(torch.nn, cls)(C, dtype=dtype, **kw)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    ours = getattr(normops.nn, cls)(C, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@devices
@pytest.mark.parametrize("cls,shape", MODULES)
@pytest.mark.parametrize("kw", [dict(), dict(affine=True),
                                dict(affine=True, track_running_stats=True),
                                dict(track_running_stats=True, momentum=None)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_instance_norm_modules(device, cls, shape, kw, dtype):
    no_batch = (cls == "InstanceNorm1d" and len(shape) == 2) or (cls == "InstanceNorm2d" and len(shape) == 3)
    C = shape[0] if no_batch else shape[1]
    ours, ref = pair(cls, C, dtype, **kw)
    ours.to(device), ref.to(device)
    x = torch.randn(shape, dtype=dtype, device=device) * 2 + 1
    step_and_compare(ours, ref, x, steps=2)
    ours.eval(), ref.eval()
    step_and_compare(ours, ref, x, steps=1)


@devices
@pytest.mark.parametrize("layout", LAYOUTS)
def test_instance_norm_keeps_layout(device, layout):
    x = make_input((2, 6, 5, 7), torch.float64, device, layout).requires_grad_()
    w = torch.rand(6, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.rand(6, dtype=torch.float64, device=device, requires_grad=True)
    y = NF.instance_norm(x, weight=w, bias=b)
    yr = TF.instance_norm(x, weight=w, bias=b)
    assert_close(y, yr)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_grads_close(y, yr, (x, w, b))


def test_instance_norm_channels_last_3d():
    x = make_input((2, 4, 3, 5, 6), torch.float32, layout="channels_last")
    assert x.is_contiguous(memory_format=torch.channels_last_3d)
    y = normops.nn.InstanceNorm3d(4)(x)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert_close(y, TF.instance_norm(x))


@pytest.mark.parametrize("running_dtype", [torch.float64, torch.float16])
def test_instance_norm_reads_running_stats_of_another_dtype(running_dtype):
    # Torch's instance norm accepts them where its batch norm does not.
    x = torch.randn(2, 3, 4, 5)
    rm = torch.randn(3, dtype=running_dtype)
    rv = torch.rand(3, dtype=running_dtype) + 0.5
    assert_close(NF.instance_norm(x, rm, rv, use_input_stats=False),
                 TF.instance_norm(x, rm, rv, use_input_stats=False))


def test_instance_norm_on_the_meta_device():
    x = torch.randn(2, 8, 6, 6, device="meta")
    for m in (normops.nn.InstanceNorm2d(8, device="meta"),
              normops.nn.InstanceNorm2d(8, affine=True, track_running_stats=True, device="meta")):
        y = m(x)
        assert y.shape == x.shape and y.device.type == "meta"


def test_instance_norm_errors_and_warnings():
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        normops.nn.InstanceNorm2d(3)(torch.randn(2, 3, 1, 1))
    with pytest.raises(ValueError, match="expected 3D or 4D input"):
        normops.nn.InstanceNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="to match num_features"):
        normops.nn.InstanceNorm2d(3, affine=True)(torch.randn(2, 4, 3, 3))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        normops.nn.InstanceNorm2d(3)(torch.randn(2, 4, 3, 3))
    assert any("does not match num_features" in str(m.message) for m in w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_instance_norm_running_var_of_small_variance(dtype, layout):
    """Variances far below eps reach running_var at full precision (taken
    back from rstd = 1/sqrt(var + eps) they lost up to a quarter of their
    value to cancellation at 1e-12 against eps 1e-5)."""
    torch.manual_seed(0)
    x = make_input((2, 3, 8, 8), dtype, layout=layout, scale=1e-6)
    ref = torch.nn.InstanceNorm2d(3, track_running_stats=True, momentum=1.0, dtype=dtype)
    ours = normops.nn.InstanceNorm2d(3, track_running_stats=True, momentum=1.0, dtype=dtype)
    ref(x), ours(x)
    expected = x.double().var(dim=(2, 3)).mean(0)  # unbiased, as torch keeps it
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(ref.running_var.double(), expected, rtol=rtol, atol=0)
    torch.testing.assert_close(ours.running_var.double(), expected, rtol=rtol, atol=0)


def test_instance_norm_eps_zero_on_a_constant_instance():
    """torch normalises a constant instance to 0 when eps is 0 (its batch
    norm's invstd is 0 there), where group norm gives NaN."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x[0, 1] = 1.5
    x.requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = NF.instance_norm(x, weight=w, bias=b, eps=0.0)
    ref = TF.instance_norm(x, weight=w, bias=b, eps=0.0)
    assert not y.isnan().any()
    assert_close(y, ref)
    assert_grads_close(y, ref, [x, w, b])


def test_instance_norm_running_stats_on_2d_input():
    """use_input_stats=False on an (N, C) input: a batch norm with the running
    statistics, as in torch."""
    x, rm, rv = torch.randn(4, 3), torch.randn(3), torch.rand(3) + 0.5
    assert_close(NF.instance_norm(x, rm, rv, use_input_stats=False),
                 TF.instance_norm(x, rm, rv, use_input_stats=False))


def test_instance_norm_failed_call_leaves_buffers():
    m = normops.nn.InstanceNorm2d(3, track_running_stats=True)
    m(torch.randn(2, 3, 4, 4))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError):
        NF.instance_norm(torch.randn(2, 3, 4, 4), m.running_mean, m.running_var,
                         torch.ones(4), None)
    for k, v in m.state_dict().items():
        assert torch.equal(before[k], v), k


def test_instance_norm_zero_batch_keeps_running_stats():
    """torch writes NaN into the running stats for an empty batch (a mean over
    zero instances); normops leaves them untouched."""
    m = normops.nn.InstanceNorm2d(3, track_running_stats=True)
    y = m(torch.randn(0, 3, 4, 4))
    assert y.shape == (0, 3, 4, 4)
    assert torch.equal(m.running_mean, torch.zeros(3))
    assert torch.equal(m.running_var, torch.ones(3))


def test_old_checkpoint_with_stray_running_stats():
    """A pre-0.4 checkpoint's running stats are reported exactly as torch does."""
    sd = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    sd = type("StateDict", (dict,), {})(sd)
    sd._metadata = {"": {"version": None}}
    messages = []
    for module in (torch.nn.InstanceNorm2d(3), normops.nn.InstanceNorm2d(3)):
        with pytest.raises(RuntimeError, match="Unexpected running stats buffer") as e:
            module.load_state_dict(sd, strict=False)
        messages.append(str(e.value).split(":", 1)[1])
    assert messages[0] == messages[1]


@pytest.mark.parametrize("eps", [-1.0, 0.0])
def test_running_var_with_eps_of_no_use(eps):
    # torch does not refuse eps <= 0; its running variance stays finite
    # where rstd is NaN or inf.
    x = torch.randn(4, 3, 5)
    x[0, 0] = 2.0  # a constant instance: rstd inf at eps 0
    stats = [(torch.zeros(3), torch.ones(3)) for _ in range(2)]
    for F, (rm, rv) in zip((torch.nn.functional, normops.functional), stats):
        F.instance_norm(x, rm, rv, use_input_stats=True, eps=eps)
    torch.testing.assert_close(stats[1], stats[0])
