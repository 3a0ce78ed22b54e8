"""Batch norm (and the fused BatchNormAct2d) against torch.nn, step by step:
outputs, input and parameter gradients, running statistics."""
import copy

import pytest
import torch
import torch.nn.functional as TF

import normops
import normops.functional as NF
from helpers import (LAYOUTS, assert_close, devices, make_input, needs_bn_bias_arg,
                     step_and_compare)

# channels_last reductions: 120 channels in register chunks of 4 vectors, then
# single vectors (AVX2: 3 chunks, 3 vectors; AVX-512: 1 chunk, 3 vectors, 8
# scalars), over more than three row blocks per thread, so that blocks are
# prefetched ahead; 1100 in row tiles, with a scalar tail.
SHAPES_2D = [(4, 3, 5, 5), (1, 6, 7, 3), (2, 5, 1, 3), (3, 2, 1, 1), (5, 17, 9, 11), (2, 64, 4, 4),
             (4, 120, 16, 13), (2, 1100, 5, 3)]


def modules(cls_name, C, dtype=torch.float32, device="cpu", **kw):
    ref = getattr(torch.nn, cls_name)(C, device=device, dtype=dtype, **kw)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
        if ref.bias is not None:
            ref.bias.uniform_(-0.5, 0.5)
    ours = getattr(normops.nn, cls_name)(C, device=device, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@devices
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES_2D)
def test_batchnorm2d_train_eval(device, dtype, layout, shape):
    ours, ref = modules("BatchNorm2d", shape[1], dtype, device)
    x = make_input(shape, dtype, device, layout)
    step_and_compare(ours, ref, x)
    ours.eval(), ref.eval()
    step_and_compare(ours, ref, x, steps=1)


@devices
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batchnorm2d_output_keeps_layout(device, layout):
    ours, _ = modules("BatchNorm2d", 8, device=device)
    x = make_input((2, 8, 5, 6), device=device, layout=layout)
    y = ours(x)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


@devices
@pytest.mark.parametrize("shape", [(8, 5), (1, 4, 9), (6, 3, 1), (4, 7, 13)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batchnorm1d(device, shape, layout):
    ours, ref = modules("BatchNorm1d", shape[1], torch.float64, device)
    step_and_compare(ours, ref, make_input(shape, torch.float64, device, layout))


@devices
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batchnorm3d(device, layout):
    ours, ref = modules("BatchNorm3d", 5, torch.float64, device)
    step_and_compare(ours, ref, make_input((2, 5, 3, 4, 5), torch.float64, device, layout))


@devices
@pytest.mark.parametrize("momentum", [0.1, None, 0.0])
@pytest.mark.parametrize("kw", [dict(), dict(affine=False),
                                pytest.param(dict(bias=False), marks=needs_bn_bias_arg),
                                dict(track_running_stats=False)])
def test_batchnorm_flags(device, momentum, kw):
    ours, ref = modules("BatchNorm2d", 4, torch.float64, device, momentum=momentum, **kw)
    x = make_input((3, 4, 5, 5), torch.float64, device)
    step_and_compare(ours, ref, x, steps=3)
    ours.eval(), ref.eval()
    step_and_compare(ours, ref, x, steps=1)


def test_batchnorm_flag_flipped_after_construction():
    ours, ref = modules("BatchNorm2d", 4, torch.float64)
    x = make_input((3, 4, 5, 5), torch.float64)
    step_and_compare(ours, ref, x, steps=1)
    ours.track_running_stats = ref.track_running_stats = False
    step_and_compare(ours, ref, x, steps=1)  # training: buffers no longer updated
    ours.eval(), ref.eval()
    step_and_compare(ours, ref, x, steps=1)  # eval: the (stale) buffers are still used


@devices
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("param_dtype", ["same", "float32"])
def test_batchnorm_reduced_precision(device, dtype, layout, param_dtype):
    pdt = dtype if param_dtype == "same" else torch.float32
    ours, _ = modules("BatchNorm2d", 6, pdt, device)
    ref = copy.deepcopy(ours).double()
    ref.__class__ = torch.nn.BatchNorm2d
    x = make_input((4, 6, 9, 7), dtype, device, layout)
    xo = x.clone().requires_grad_()
    xr = x.double().requires_grad_()
    yo, yr = ours(xo), ref(xr)
    assert yo.dtype == dtype
    assert_close(yo, yr, dtype)
    g = torch.randn_like(yr)
    yo.backward(g.to(dtype))
    yr.backward(g)
    assert_close(xo.grad, xr.grad, dtype, grad=True)
    assert_close(ours.weight.grad, ref.weight.grad, dtype, grad=True, rtol=2e-2, atol=5e-2)
    assert ours.running_var.dtype == pdt
    assert_close(ours.running_var, ref.running_var, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "relu6"])
def test_eval_short_planes_split_across_threads(dtype, activation):
    """NCHW eval: runs of short planes take their constants in one kernel
    call (plane_affine, plane_grad_input). 5 x 3001 planes of 6 values make
    parallel tasks of thousands of planes that start and end inside a
    sample: each run is cut where the channel index wraps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        C = 3001
        x = torch.randn(5, C, 2, 3).to(dtype).requires_grad_()
        xr = x.detach().double().requires_grad_()
        rm, rv = torch.randn(C), torch.rand(C) + 0.5
        w, b = torch.randn(C), torch.randn(C)
        y = NF.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, activation=activation)
        pre = TF.batch_norm(xr, rm.double(), rv.double(), w.double(), b.double(), False,
                            0.1, 1e-5)
        assert_close(y, TF.relu6(pre) if activation else pre, dtype)
        g = torch.randn(pre.shape, dtype=torch.float64)
        (gx,) = torch.autograd.grad(y, x, g.to(dtype))
        # ReLU6's mask as normops applies it, at the pre-activation rounded
        # to dtype: where the output is strictly inside (0, 6).
        mask = ((y > 0) & (y < 6)).double() if activation else 1.0
        (gr,) = torch.autograd.grad(pre, xr, g * mask)
        assert_close(gx, gr, dtype, grad=True)
    finally:
        torch.set_num_threads(threads)


@devices
@pytest.mark.parametrize("activation,act", [("relu", TF.relu), ("relu6", TF.relu6), (None, None)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eval_gradients_at_nonfinite_inputs(device, activation, act, layout, dtype):
    """With running statistics the input gradient is weight * invstd * dy,
    masked where torch's activation backward masks it (a NaN output passes
    the gradient): finite even where x is NaN or infinite."""
    torch.manual_seed(0)
    x = make_input((3, 4, 5, 5), dtype, device, layout, scale=3.0)
    with torch.no_grad():
        x[0, 1, 2, 3], x[1, 2, 0, 0], x[2, 3, 4, 4], x[0, 0, 0, 1] = (
            float("nan"), float("inf"), -float("inf"), 1e30)
    x.requires_grad_()
    xr = x.detach().clone().requires_grad_()
    rm, w, b = (torch.randn(4, dtype=dtype, device=device) for _ in range(3))
    rv = torch.rand(4, dtype=dtype, device=device) + 0.5
    y = NF.batch_norm(x, rm, rv, w, b, False, activation=activation)
    ref = TF.batch_norm(xr, rm, rv, w, b, False)
    ref = act(ref) if act else ref
    assert_close(y, ref, dtype)
    g = torch.randn_like(ref)
    (gx,), (gr,) = torch.autograd.grad(y, x, g), torch.autograd.grad(ref, xr, g)
    assert gx.isfinite().all()
    assert_close(gx, gr, dtype, grad=True)


@devices
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eval_input_gradient_of_an_infinite_weight(device, layout, dtype):
    """weight * invstd * dy, as torch: +-inf (NaN only where dy is 0), not
    inf * 0 = NaN from the batch-statistics terms that eval does not have."""
    torch.manual_seed(0)
    for shape in ((3, 4, 5, 5), (3, 4)):
        x = make_input(shape, dtype, device, layout if len(shape) == 4 else "contiguous")
        x.requires_grad_()
        w = torch.tensor([float("inf"), 1.0, -float("inf"), 2.0], dtype=dtype, device=device)
        rm, b = (torch.randn(4, dtype=dtype, device=device) for _ in range(2))
        rv = torch.rand(4, dtype=dtype, device=device) + 0.5
        g = torch.randn(shape, dtype=dtype, device=device)
        (gx,) = torch.autograd.grad(NF.batch_norm(x, rm, rv, w, b, False), x, g)
        (gr,) = torch.autograd.grad(TF.batch_norm(x, rm, rv, w, b, False), x, g)
        torch.testing.assert_close(gx, gr, equal_nan=True)
        assert gx[:, 0].isinf().all()


@devices
@pytest.mark.parametrize("activation,act", [("relu", TF.relu), ("relu6", TF.relu6), (None, None)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batchnorm_act2d(device, activation, act, layout):
    ref = torch.nn.BatchNorm2d(5, device=device, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 3.0)
        ref.bias.uniform_(-1, 4)
    ours = normops.nn.BatchNormAct2d(5, activation=activation, device=device, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = make_input((4, 5, 6, 6), torch.float64, device, layout, scale=3.0)
    step_and_compare(ours, ref, x, act=act)
    ours.eval(), ref.eval()
    step_and_compare(ours, ref, x, act=act, steps=1)


def test_batchnorm_act2d_signature_and_errors():
    m = normops.nn.BatchNormAct2d(3)
    assert m.activation == "relu" and "activation='relu'" in repr(m)
    with pytest.raises(ValueError, match="activation"):
        normops.nn.BatchNormAct2d(3, activation="gelu")


@needs_bn_bias_arg
def test_batchnorm_act2d_without_bias():
    no_bias = normops.nn.BatchNormAct2d(3, activation="relu6", bias=False)
    assert no_bias.bias is None
    assert list(no_bias.state_dict()) == list(torch.nn.BatchNorm2d(3, bias=False).state_dict())


def test_functional_batch_norm_matches_torch():
    x = make_input((4, 3, 6, 6), torch.float64)
    w, b = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    rm, rv = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    y = NF.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, eps=1e-3)
    y2 = TF.batch_norm(x, rm2, rv2, w, b, training=True, momentum=0.3, eps=1e-3)
    assert_close(y, y2)
    assert_close(rm, rm2)
    assert_close(rv, rv2)
    assert_close(NF.batch_norm(x, rm, rv, w, b), TF.batch_norm(x, rm2, rv2, w, b))
    assert_close(NF.batch_norm(x, None, None, training=True),
                 TF.batch_norm(x, None, None, training=True))


def test_large_mean_variance():
    """1e4 + N(0, 1) in float32: the naive E[x^2] - E[x]^2 loses every digit."""
    x = make_input((8, 4, 32, 32), torch.float32, offset=1e4)
    for layout in ("contiguous", "channels_last"):
        xi = make_input((8, 4, 32, 32), torch.float32, layout=layout, offset=1e4)
        mean, var = torch.ops.normops.batch_norm_stats(xi)
        ref = xi.double().var(dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(var.double(), ref, rtol=1e-4, atol=0)
    m = normops.nn.BatchNorm2d(4)
    y = m(x)
    ref = TF.batch_norm(x.double(), None, None, training=True)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize("shape", [(32, 64, 28, 28), (4, 64, 112, 112), (64, 64, 16, 16)])
def test_nchw_training_variance_of_many_blocks_at_a_large_mean(shape):
    """The fused NCHW training forward merges each channel's 16 KB blocks in
    double, each block's mean as its rounded centre plus the residual: merged
    from the rounded means alone, the variance of 1e4 + N(0, 1) was 1e-5
    wrong (32x64x28x28)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, dtype=torch.float64, generator=g) + 1e4).float()
    _, mean, var = torch.ops.normops.batch_norm(x, None, None, None, None, True, 1e-5, 0)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(var.double(), ref_var, rtol=2e-6, atol=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=0, atol=1e-3)  # an ulp


@pytest.mark.parametrize("threads", [1, 2])
def test_channels_last_mean_after_an_outlier_in_the_first_row(threads):
    """An outlier (1e4 in N(0, 1)) as the first row of every channel, and of
    the second thread's rows: the blocks' means merged in float relative to
    that row were off by 1e-3 standard deviations (0.037)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 300, 300, generator=g)
    x[0, :, 0, 0] = 1e4
    x[0, :, 150, 0] = -1e4
    x = x.contiguous(memory_format=torch.channels_last)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mean, var = torch.ops.normops.batch_norm_stats(x)
    finally:
        torch.set_num_threads(previous)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=0, atol=1e-5)
    # The outlier's block, shifted by it, loses up to log10(128) digits.
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(32, 64, 28, 28), (256, 16, 4, 4)])
def test_nchw_stats_variance_of_many_planes_at_a_large_mean(shape):
    """batch_norm_stats (SyncBatchNorm's) on NCHW reduces planes in parallel
    and merges their moments per channel, in double: merged in float at 1e4's
    scale the variance was 3e-5 to 1.4e-4 wrong; what is left (1e-5 to
    2.3e-5) is the planes' means rounded to float."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, dtype=torch.float64, generator=g) + 1e4).float()
    mean, var = torch.ops.normops.batch_norm_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(var.double(), ref_var, rtol=5e-5, atol=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=0, atol=1e-3)  # an ulp


@pytest.mark.parametrize("shape", [(8, 3, 112, 112), (2, 16, 128, 128), (64, 8, 16, 16)])
def test_channels_last_variance_of_many_blocks_at_a_large_mean(shape):
    """Hundreds of 128-row blocks of 1e4 + N(0, 1): their means are merged
    in double, and the tasks' partial results as a float plus a residual.
    Merged in float at 1e4's scale, where float32 rounds to 1e-3, the
    variance was 3e-5 to 7e-5 wrong, and 1e-6 to 3e-6 with only the tasks'
    merge at that scale."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, dtype=torch.float64, generator=g) + 1e4).float()
    x = x.contiguous(memory_format=torch.channels_last)
    mean, var = torch.ops.normops.batch_norm_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(var.double(), ref_var, rtol=1.5e-6, atol=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=0, atol=1e-3)  # an ulp


@devices
@pytest.mark.parametrize("C", [4, 576, 1100])
def test_channels_last_variance_with_outlier_rows(device, C):
    """Channels_last statistics are summed in row blocks shifted by a value of
    the block: a far outlier in a block's first row, on a large mean, must not
    cost the variance its accuracy."""
    x = make_input((8, C, 16, 16), torch.float32, layout="channels_last", offset=1e4)
    rows = x.permute(0, 2, 3, 1).reshape(-1, C)  # a view: writes land in x
    rows[::8] += 40.0
    x = x.to(device)
    mean, var = torch.ops.normops.batch_norm_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("offset,atol", [(1e4, 1e-5), (300.0, 3e-6), (-7.5, 3e-6), (7.5, 3e-6)])
def test_affine_step_centres_large_means(layout, offset, atol):
    """Statistics far from zero keep the affine step centred, x - mean first:
    folded into the bias (x * scale + (bias - mean * scale)), x * scale and
    the folded bias would round at the mean's scale, an error of about 1e-3 at
    1e4 and 2e-5 at 300. Within a few standard deviations of zero the fold is
    allowed (channels_last reads one array of constants fewer) and costs a few
    units in the last place."""
    C = 6
    x = make_input((4, C, 5, 7), torch.float32, layout=layout, offset=offset)
    m = normops.nn.BatchNorm2d(C).eval()
    with torch.no_grad():
        m.running_mean.fill_(offset)
        m.running_var.uniform_(1.0, 2.0)  # offset / std <= 7.5
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    per_channel = [t.double().view(1, C, 1, 1) for t in
                   (m.running_mean, m.running_var, m.weight, m.bias)]
    mean, var, weight, bias = per_channel
    ref = (x.double() - mean) / torch.sqrt(var + m.eps) * weight + bias
    torch.testing.assert_close(m(x).double(), ref, rtol=0, atol=atol)


def test_constant_channels_give_bias():
    x = torch.full((4, 3, 5, 5), 3e7)
    m = normops.nn.BatchNorm2d(3)
    with torch.no_grad():
        m.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
    y = m(x)
    torch.testing.assert_close(y, m.bias.view(1, 3, 1, 1).expand_as(y).detach())


@devices
@pytest.mark.parametrize("cls,shape", [("BatchNorm1d", (0, 4)), ("BatchNorm2d", (0, 4, 3, 3)),
                                       ("BatchNorm3d", (0, 4, 2, 2, 2))])
def test_zero_size_batch(device, cls, shape):
    ours, ref = modules(cls, 4, torch.float64, device)
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    y = ours(x)
    assert y.shape == x.shape
    yr = ref(x)
    (y.sum() + yr.sum()).backward()
    assert torch.equal(ours.running_mean, ref.running_mean)
    assert torch.equal(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1
    assert torch.equal(ours.weight.grad, torch.zeros_like(ours.weight))


def test_one_value_per_channel():
    m = normops.nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(torch.randn(1, 3))
    m2 = normops.nn.BatchNorm2d(3)
    m2(torch.randn(1, 3, 2, 1))  # N = 1 is fine with more than one spatial element
    m2.eval()
    m2(torch.randn(1, 3, 1, 1))  # eval with buffers: fine


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: torch.randn(2, 3, 4), ValueError, "expected 4D input"),
    (lambda: torch.randn(2, 5, 4, 4), RuntimeError, r"expected weight of shape \[5\]"),
    (lambda: torch.randint(0, 5, (2, 3, 4, 4)), NotImplementedError, "floating point"),
])
def test_bad_input_leaves_buffers(bad, exc, match):
    m = normops.nn.BatchNorm2d(3)
    m(torch.randn(4, 3, 4, 4))
    before = snapshot(m)
    with pytest.raises(exc, match=match):
        m(bad())
    after = snapshot(m)
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("input_dtype,running_dtype", [
    (torch.float32, torch.float64), (torch.float32, torch.float16),
    (torch.float64, torch.float32), (torch.bfloat16, torch.float64)])
def test_running_stats_of_another_dtype_are_refused(input_dtype, running_dtype, training):
    # Torch refuses them too ("expected scalar type Float but found Double").
    x = torch.randn(4, 3, 5, 5, dtype=input_dtype)
    rm, rv = torch.zeros(3, dtype=running_dtype), torch.ones(3, dtype=running_dtype)
    with pytest.raises(RuntimeError):
        TF.batch_norm(x, rm, rv, training=training)
    with pytest.raises(RuntimeError, match="expected running_mean to have dtype"):
        NF.batch_norm(x, rm, rv, training=training)
    assert torch.equal(rm, torch.zeros(3, dtype=running_dtype))
    assert torch.equal(rv, torch.ones(3, dtype=running_dtype))


def test_bad_parameters_leave_buffers():
    m = normops.nn.BatchNorm2d(3)
    before = snapshot(m)
    x = torch.randn(4, 3, 4, 4)
    with pytest.raises(RuntimeError, match="weight of shape"):
        NF.batch_norm(x, m.running_mean, m.running_var, torch.ones(4), None, True)
    with pytest.raises(RuntimeError, match="dtype"):
        NF.batch_norm(x, m.running_mean, m.running_var, torch.ones(3, dtype=torch.float64),
                      None, True)
    with pytest.raises(RuntimeError, match="same device"):
        NF.batch_norm(x, m.running_mean, m.running_var, torch.ones(3, device="meta"), None, True)
    with pytest.raises(ValueError, match="activation"):
        NF.batch_norm(x, m.running_mean, m.running_var, training=True, activation="gelu")
    for k, v in snapshot(m).items():
        assert torch.equal(before[k], v), k


def test_state_dict_round_trip_and_old_checkpoint():
    ref = torch.nn.BatchNorm2d(4)
    ref(torch.randn(3, 4, 2, 2))
    ours = normops.nn.BatchNorm2d(4)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    # A version-1 checkpoint without num_batches_tracked still loads.
    sd = ref.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    ours.load_state_dict(sd)
    assert isinstance(ours, torch.nn.BatchNorm2d)
    assert ours.num_batches_tracked.dtype == torch.long


def test_split_ops_compose_to_batch_norm():
    """stats -> elemt and backward_reduce -> backward_elemt (what
    SyncBatchNorm composes) give the single-call results."""
    ops = torch.ops.normops
    x = make_input((4, 3, 5, 5), torch.float64, layout="channels_last")
    w, b = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    mean, var = ops.batch_norm_stats(x)
    y = ops.batch_norm_elemt(x, w, b, mean, var, 1e-5, 2)
    y1, m1, v1 = ops.batch_norm(x, w, b, None, None, True, 1e-5, 2)
    assert_close(y, y1)
    g = torch.randn_like(y)
    sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(g, x, mean, var, w, b, 1e-5, 2)
    n = x.numel() // 3
    dx = ops.batch_norm_backward_elemt(g, x, mean, var, w, b, sum_dy / n, sum_dy_xmu / n, 1e-5, 2)
    dx1, dw1, db1 = ops.batch_norm_backward(g, x, w, b, mean, var, True, 1e-5, 2, [True] * 3)
    assert_close(dx, dx1)
    assert_close(sum_dy, db1)
    assert_close(sum_dy_xmu * (var + 1e-5).rsqrt(), dw1)


def test_grad_output_layout_differs_from_input():
    x = make_input((3, 4, 5, 6), torch.float64, layout="channels_last").requires_grad_()
    m, ref = modules("BatchNorm2d", 4, torch.float64)
    g = torch.randn(3, 4, 5, 6, dtype=torch.float64)  # contiguous
    (gx,) = torch.autograd.grad(m(x), x, g)
    (gr,) = torch.autograd.grad(ref(x), x, g)
    assert_close(gx, gr)


def test_no_grad_training_updates_running_stats():
    ours, ref = modules("BatchNorm2d", 3)
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        ours(x), ref(x)
    assert_close(ours.running_var, ref.running_var)


@devices
@pytest.mark.parametrize("running_dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [0, 1, 9])
def test_update_running_stats(device, running_dtype, count):
    mean, var = torch.randn(6, device=device), torch.rand(6, device=device)
    rm = torch.randn(6, device=device, dtype=running_dtype)
    rv = torch.rand(6, device=device, dtype=running_dtype)
    unbias = count / max(count - 1, 1)
    want_m = rm.double() * 0.7 + mean.double() * 0.3 if count else rm.double()
    want_v = rv.double() * 0.7 + var.double() * unbias * 0.3 if count else rv.double()
    torch.ops.normops.update_running_stats(rm, rv, mean, var, 0.3, count)
    tol = dict(rtol=1e-2, atol=1e-2) if running_dtype == torch.bfloat16 else {}
    torch.testing.assert_close(rm.double(), want_m, **tol)
    torch.testing.assert_close(rv.double(), want_v, **tol)


@devices
def test_update_running_stats_edge_cases(device):
    mean, var = torch.randn(5, device=device), torch.rand(5, device=device)
    torch.ops.normops.update_running_stats(None, None, mean, var, 0.1, 8)  # nothing to update
    rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
    torch.ops.normops.update_running_stats(rm, rv, mean.half(), var.half(), 0.5, 8)
    torch.testing.assert_close(rm, mean.half().float() * 0.5)
    torch.testing.assert_close(rv, 0.5 + var.half().float() * (8 / 7) * 0.5)


def test_update_running_stats_bad_input_writes_nothing():
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(RuntimeError, match="running_var"):
        torch.ops.normops.update_running_stats(rm, torch.ones(5), torch.ones(4), torch.ones(4), 0.5, 3)
    with pytest.raises(RuntimeError, match="mean and var"):
        torch.ops.normops.update_running_stats(rm, rv, torch.ones(4), torch.ones(3), 0.5, 3)
    assert rm.eq(0).all() and rv.eq(1).all()


def test_update_running_stats_bumps_versions():
    # Caches keyed on tensor versions (the inverted residual's folded
    # weights) must see the kernel's write.
    rm, rv = torch.zeros(3), torch.ones(3)
    versions = rm._version, rv._version
    with torch.no_grad():
        torch.ops.normops.update_running_stats(rm, rv, torch.ones(3), torch.ones(3), 0.1, 5)
    assert rm._version > versions[0] and rv._version > versions[1]


@pytest.mark.parametrize("strided", [False, True])
def test_running_stats_created_in_inference_mode(strided):
    # Buffers made under torch.inference_mode are inference tensors, with no
    # version counter. torch's batch norm updates them outside it as well;
    # the update used to write them and then raise on the version bump.
    with torch.inference_mode():
        rm, rv = torch.zeros(6), torch.ones(6)
    x = torch.randn(4, 3, 5) + 2
    ref_m, ref_v = torch.zeros(3), torch.ones(3)
    TF.batch_norm(x, ref_m, ref_v, training=True)
    running = (rm[::2], rv[::2]) if strided else (rm[:3], rv[:3])
    out = normops.functional.batch_norm(x, *running, training=True)
    assert_close(out, TF.batch_norm(x, None, None, training=True))
    assert_close(running[0], ref_m)
    assert_close(running[1], ref_v)


def test_module_made_in_inference_mode_refuses_training_untouched():
    # Its counter cannot move outside inference_mode: torch raises there
    # before normalising, and a failing normops call must leave the running
    # statistics as torch's does.
    with torch.inference_mode():
        ours, ref = normops.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5) + 2
    for m in (ref, ours):
        with pytest.raises(RuntimeError, match="inference"):
            m(x)
    for name, buffer in ref.named_buffers():
        torch.testing.assert_close(ours.get_buffer(name), buffer)
    assert ours.running_mean.eq(0).all()
