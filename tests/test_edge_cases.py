"""Edge cases found by review: each failed before its fix."""
import pytest
import torch

import normops
import normops.functional as NF
from helpers import assert_close, check_half_conversions


@pytest.mark.parametrize("make", [lambda: normops.nn.BatchNorm2d(3),
                                  lambda: normops.nn.InstanceNorm2d(3, track_running_stats=True)])
def test_eval_graph_survives_a_later_training_step(make):
    """The eval graph keeps its own copy of the running stats, so a training
    forward before its backward (which updates the buffers in place) neither
    breaks it nor changes its gradient."""
    x = torch.randn(2, 3, 4, 4) * 3 + 1
    m = make()
    m.eval()
    expected = torch.autograd.grad(m(x.requires_grad_()).sum(), x)[0]
    m.train()
    expected = expected + torch.autograd.grad((m(x) ** 2).sum(), x)[0]
    m = make()
    m.eval()
    y1 = m(x)
    m.train()
    y2 = m(x)  # updates running_mean / running_var in place
    got = torch.autograd.grad(y1.sum() + (y2 ** 2).sum(), x)[0]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("make", [lambda: normops.nn.BatchNorm1d(8),
                                  lambda: normops.nn.GroupNorm(2, 8),
                                  lambda: normops.nn.InstanceNorm1d(8)])
def test_transposed_3d_input_gives_contiguous_output(make):
    x = torch.randn(4, 10, 8).transpose(1, 2)
    y = make()(x)
    assert y.is_contiguous()
    y.view(4, -1)


def test_instance_norm_zero_spatial_keeps_running_stats():
    rm, rv = torch.full((3,), 5.0), torch.full((3,), 2.0)
    NF.instance_norm(torch.randn(2, 3, 0), rm, rv)
    assert torch.equal(rm, torch.full((3,), 5.0)) and torch.equal(rv, torch.full((3,), 2.0))


def test_layer_norm_over_an_empty_shape():
    x = torch.randn(4, 0, requires_grad=True)
    w = torch.ones(0, requires_grad=True)
    NF.layer_norm(x, (0,), w).sum().backward()
    assert x.grad.shape == (4, 0) and w.grad.shape == (0,)


@pytest.mark.parametrize("value", [3e8, 3e19])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_large_constant_channels_have_zero_variance(layout, value):
    """3e19 squared overflows float32: a merge into empty moments must not
    form delta^2 * 0."""
    x = torch.full((5, 46, 11, 17), value).to(memory_format=layout)
    _, var = torch.ops.normops.batch_norm_stats(x)
    assert var.eq(0).all()
    assert not NF.batch_norm(x, None, None, training=True).isnan().any()
    assert not NF.group_norm(x, 2).isnan().any()
    assert not NF.instance_norm(x).isnan().any()
    assert not NF.layer_norm(x.reshape(5, -1)[:, :1024], (1024,)).isnan().any()


def test_backward_ops_check_the_statistics_device():
    x = torch.randn(2, 4, 3, 3)
    ops = torch.ops.normops
    with pytest.raises(RuntimeError, match="mean to be on the same device"):
        ops.group_norm_backward(x, x, 2, torch.zeros(2, 2, device="meta"), torch.ones(2, 2),
                                None, [True, True, True])
    with pytest.raises(RuntimeError, match="rstd to be on the same device"):
        ops.layer_norm_backward(x, x, [3], torch.zeros(2, 4, 3, 1),
                                torch.ones(2, 4, 3, 1, device="meta"), None, None,
                                [True, True, True])


def test_one_running_buffer_is_an_error():
    for mean, var in ((torch.zeros(3), None), (None, torch.ones(3))):
        with pytest.raises(ValueError, match="both be None or neither"):
            NF.batch_norm(torch.randn(4, 3), mean, var, training=True)
        with pytest.raises(ValueError, match="both be None or neither"):
            NF.instance_norm(torch.randn(4, 3, 5), mean, var)
        assert (mean if mean is not None else var - 1).eq(0).all()  # untouched


def test_argument_errors_of_torchs_type():
    x = torch.randn(4, 3, 5)
    with pytest.raises(TypeError, match="momentum"):
        NF.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=None)
    with pytest.raises(TypeError, match="momentum"):
        NF.instance_norm(x, momentum=None)
    with pytest.raises(TypeError, match="must be float, not str"):
        normops.nn.BatchNorm1d(3, momentum="a")(x)
    with pytest.raises(TypeError, match="must be float, not str"):
        NF.instance_norm(x, torch.zeros(3), torch.ones(3), momentum="a")
    mean = torch.zeros(3)
    NF.batch_norm(x, mean, torch.ones(3), training=True, momentum=torch.tensor(0.5))
    assert_close(mean, 0.5 * x.mean((0, 2)))  # a 0-d tensor momentum converts, as in torch
    with pytest.raises(RuntimeError, match="expected at least 2D input"):
        NF.batch_norm(torch.randn(4), torch.zeros(4), torch.ones(4))
    with pytest.raises(RuntimeError, match="when use_input_stats is false"):
        NF.instance_norm(x, use_input_stats=False)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stats_that_require_grad_are_refused(training, which):
    x = torch.randn(3, 4, 5, 5)
    stats = {"running_mean": torch.zeros(4), "running_var": torch.ones(4)}
    stats[which].requires_grad_()
    for ours, theirs, mode in ((NF.batch_norm, torch.nn.functional.batch_norm, "training"),
                               (NF.instance_norm, torch.nn.functional.instance_norm,
                                "use_input_stats")):
        with pytest.raises(RuntimeError, match=which):
            theirs(x, stats["running_mean"], stats["running_var"], **{mode: training})
        with pytest.raises(RuntimeError, match=f"with respect to {which}"):
            ours(x, stats["running_mean"], stats["running_var"], **{mode: training})
    assert torch.equal(stats["running_mean"], torch.zeros(4))
    with torch.no_grad():  # as torch: no graph, no refusal
        NF.batch_norm(x, stats["running_mean"], stats["running_var"], training=training)


@pytest.mark.parametrize("ours,theirs,shape,run_shape", [
    (lambda: normops.nn.BatchNorm1d(3), lambda: torch.nn.BatchNorm1d(3), (2, 3), (64, 3)),
    (lambda: normops.nn.BatchNormAct2d(3, activation="relu"),
     lambda: torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.ReLU()), (2, 3, 1, 1),
     (8, 3, 2, 3)),
    (lambda: normops.nn.InstanceNorm1d(3, track_running_stats=True),
     lambda: torch.nn.InstanceNorm1d(3, track_running_stats=True), (1, 3, 2), (4, 3, 9)),
])
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_counts_the_running_variance_batch_at_run_time(ours, theirs, shape, run_shape):
    """A traced training step's unbiased running variance uses the batch it
    runs on, not the one it was traced with, as torch's traced module does."""
    torch.manual_seed(0)
    example, x = torch.randn(shape), torch.randn(run_shape)
    traced = [torch.jit.trace(make(), (example,), check_trace=False) for make in (ours, theirs)]
    outs = [t(x) for t in traced]
    torch.testing.assert_close(outs[0], outs[1])
    buffers = [dict(t.named_buffers()) for t in traced]
    for name, value in buffers[0].items():
        torch.testing.assert_close(value, buffers[1][name if name in buffers[1] else "0." + name])


@pytest.mark.parametrize("make,shape", [
    (lambda: normops.nn.GroupNorm(1, 3), (2, 3, 4)),
    (lambda: normops.nn.LayerNorm(4), (2, 3, 4)),
    (lambda: normops.nn.BatchNormAct2d(3, activation="relu6").eval(), (2, 3, 2, 2)),
    (lambda: normops.nn.InstanceNorm2d(3, affine=True), (2, 3, 2, 2)),
])
def test_torch_func_transforms(make, shape):
    """Inside torch.func transforms the same numbers come from torch's ops
    (the normops ops have no forward-mode or batching rules)."""
    m = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    t = torch.randn_like(x)  # not constant: the norms are shift-invariant
    out, tangent = torch.func.jvp(m, (x,), (t,))
    # Reference tangent by finite differences.
    h = 1e-6
    fd = (m(x + h * t) - m(x - h * t)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-5)
    assert tangent.abs().sum() > 0
    per_sample = torch.func.vmap(lambda v: m(v.unsqueeze(0)).squeeze(0))(x)
    assert per_sample.shape == x.shape
    g = torch.func.grad(lambda v: m(v).pow(2).sum())(x)
    (expected,) = torch.autograd.grad(m(x.requires_grad_()).pow(2).sum(), x)
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_relu6_mask_uses_the_stored_pre_activation(dtype):
    """Just below 6 in float but 6 once rounded to the input dtype: the
    unfused BatchNorm -> ReLU6 passes no gradient there, nor must the fused."""
    x = torch.full((2, 1, 1, 1), 5.96875, dtype=dtype, requires_grad=True)
    w = torch.tensor([1.004])
    args = (torch.zeros(1), torch.ones(1), w, None, False)
    (got,) = torch.autograd.grad(NF.batch_norm(x, *args, activation="relu6").sum(), x)
    (ref,) = torch.autograd.grad(torch.nn.functional.relu6(
        torch.nn.functional.batch_norm(x, *args)).sum(), x)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["planes", "rows"])
def test_half_conversions_match_torch(dtype, layout):
    """Every 16-bit pattern through the forward and the gradient kernels, in
    this process's CPU build (test_runtime runs it in every build)."""
    check_half_conversions(dtype, layout)


def test_forward_mode_ad_gives_torch_tangents():
    """torch.autograd.forward_ad: the normops ops have no forward-mode rules,
    so dual inputs take torch's computation instead of losing the tangent."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as TF
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64) + 0.5
    cases = [(NF.layer_norm, TF.layer_norm, dict(normalized_shape=[3, 3])),
             (NF.group_norm, TF.group_norm, dict(num_groups=2, weight=w)),
             (NF.instance_norm, TF.instance_norm, dict(weight=w)),
             (NF.batch_norm, TF.batch_norm, dict(running_mean=None, running_var=None,
                                                 weight=w, training=True))]
    for ours, theirs, kwargs in cases:
        tangents = []
        for f in (ours, theirs):
            with fwAD.dual_level():
                tangents.append(fwAD.unpack_dual(f(fwAD.make_dual(x, t), **kwargs)).tangent)
        assert tangents[0] is not None, ours.__name__
        torch.testing.assert_close(tangents[0], tangents[1])
    m = normops.nn.BatchNorm2d(4).double()
    with fwAD.dual_level():
        assert fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent is not None


def test_batch_norm_eps_must_be_positive():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        normops.nn.BatchNorm2d(3, eps=0.0)(x)
    m = normops.nn.BatchNorm2d(3, eps=-1e-3).eval()
    with pytest.raises(ValueError, match="eps must be non-negative"):
        m(x)
    assert torch.equal(m.running_mean, torch.zeros(3))


@pytest.mark.parametrize("training", [True, False])
def test_strided_running_buffers_are_read_and_updated(training):
    """Running statistics that are slices of larger buffers work as in torch;
    an expanded one (elements sharing memory) cannot be updated in place."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5)
    ours, ref = torch.rand(2, 6), torch.empty(2, 6)
    ref.copy_(ours)
    out = NF.batch_norm(x, ours[0, ::2], ours[1, ::2], training=training)
    expected = torch.nn.functional.batch_norm(x, ref[0, ::2], ref[1, ::2], training=training)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ours, ref)
    NF.instance_norm(x, ours[0, 1::2], ours[1, 1::2])
    torch.nn.functional.instance_norm(x, ref[0, 1::2], ref[1, 1::2])
    torch.testing.assert_close(ours, ref)
    if training:
        var = torch.ones(3)
        with pytest.raises(RuntimeError, match="share memory"):
            NF.batch_norm(x, torch.zeros(1).expand(3), var, training=True)
        assert var.eq(1).all()


def test_refused_update_inside_torch_func_moves_nothing():
    """Inside jacrev the running-stat update of a captured buffer is refused:
    as with torch's module, neither the statistics nor the counter move."""
    from torch.func import jacrev
    for make in (torch.nn.BatchNorm1d, normops.nn.BatchNorm1d):
        m = make(3).train()
        with pytest.raises(RuntimeError):
            jacrev(m)(torch.randn(4, 3))
        assert m.running_mean.eq(0).all() and m.running_var.eq(1).all()
        assert m.num_batches_tracked == 0


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels", [3, 16, 144])
def test_statistics_of_extreme_values(layout, channels):
    """A spread of 1e17 in float32 (squares near 1e34) keeps its variance,
    and an Inf or NaN makes its channel's statistics NaN, as in torch,
    rather than a variance clamped to 0."""
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(4, channels, 8, 8, dtype=torch.float64) * 1e17).float()
    x = x.contiguous(memory_format=fmt)
    ref = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    torch.testing.assert_close(NF.batch_norm(x, None, None, training=True).double(), ref,
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(NF.group_norm(x, 1).double(),
                               torch.nn.functional.group_norm(x.double(), 1), rtol=0, atol=1e-4)
    for bad in (float("inf"), float("nan")):
        x = torch.randn(2, channels, 4, 4)
        x[0, 1, 1, 1] = bad
        x = x.contiguous(memory_format=fmt)
        mean, var = torch.zeros(channels), torch.ones(channels)
        y = NF.batch_norm(x, mean, var, training=True)
        assert var[1].isnan() and y[:, 1].isnan().all()
        assert var[torch.arange(channels) != 1].isfinite().all()
        assert NF.group_norm(x, channels)[0, 1].isnan().all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 40, 30, 30), (2, 144, 7, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinities_give_torchs_running_mean(layout, shape, dtype):
    """A channel holding +inf has a running mean of +inf, as torch's (its
    batch mean is a sum over the channel), in every merge of partial
    statistics: +inf in a block's first row (the shift of the channels_last
    sums), in one task's rows only, +inf with -inf (NaN), -inf alone."""
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(*shape, dtype=dtype)
    x[0, 0, 0, 0] = float("inf")
    x[1, 1, -1, -1] = float("inf")
    x[0, 2, 0, 0], x[-1, 2, 1, 2] = float("inf"), float("-inf")
    x[-1, -1, 2, 3] = float("-inf")
    x = x.contiguous(memory_format=fmt)
    ours, theirs = normops.nn.BatchNorm2d(shape[1]).to(dtype), torch.nn.BatchNorm2d(shape[1]).to(dtype)
    ours(x), theirs(x)
    for a, b in ((ours.running_mean, theirs.running_mean), (ours.running_var, theirs.running_var)):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        torch.testing.assert_close(a[a.isfinite()], b[b.isfinite()])
        assert torch.equal(a[a.isinf()], b[b.isinf()])
    mean, _ = torch.ops.normops.batch_norm_stats(x)
    torch.testing.assert_close(mean, ours.running_mean / 0.1, equal_nan=True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float64_backward_at_a_huge_spread(layout):
    """rstd^3 underflows double at a spread of 1e105: the input gradient's
    correction term must not vanish."""
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(2, 4, 5, 6, dtype=torch.float64) * 1e110).contiguous(memory_format=fmt)
    g = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    TF = torch.nn.functional
    for ours, theirs in ((lambda t: NF.batch_norm(t, None, None, training=True),
                          lambda t: TF.batch_norm(t, None, None, training=True)),
                         (lambda t: NF.group_norm(t, 2), lambda t: TF.group_norm(t, 2)),
                         (NF.instance_norm, lambda t: TF.instance_norm(t.contiguous()))):
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        do, = torch.autograd.grad(ours(xo), xo, g)
        dt, = torch.autograd.grad(theirs(xt), xt, g)
        torch.testing.assert_close(do, dt, rtol=1e-10, atol=1e-10 * dt.abs().max().item())


def _sliced_channels_last(kind):
    if kind == "3d":
        return torch.randn(2, 6, 4, 5, 8).contiguous(memory_format=torch.channels_last_3d)[..., ::2]
    x = torch.randn(3, 12, 6, 8).contiguous(memory_format=torch.channels_last)
    return x[:, ::2] if kind == "channels" else x[..., ::2]


@pytest.mark.parametrize("kind", ["width", "channels", "3d"])
@pytest.mark.parametrize("op", ["bn_train", "bn_eval", "gn"])
def test_sliced_channels_last_input_keeps_torchs_layout(op, kind):
    # torch lays the output of a non-dense input out as the input's strides
    # suggest (channels_last here), not contiguous.
    x = _sliced_channels_last(kind)
    C = x.size(1)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    call = {"bn_train": lambda F: F.batch_norm(x, None, None, w, b, True),
            "bn_eval": lambda F: F.batch_norm(x, rm, rv, w, b, False),
            "gn": lambda F: F.group_norm(x, 3, w, b)}[op]
    got, want = call(NF), call(torch.nn.functional)
    assert got.stride() == want.stride()
    assert_close(got, want)
    ops = torch.ops.normops
    op_args = {"bn_train": (ops.batch_norm, (x, w, b, None, None, True, 1e-5, 0)),
               "bn_eval": (ops.batch_norm, (x, w, b, rm, rv, False, 1e-5, 0)),
               "gn": (ops.group_norm, (x, 3, w, b, 1e-5))}[op]
    torch.library.opcheck(*op_args)


def test_sliced_channels_last_instance_norm_stays_channels_last():
    x = _sliced_channels_last("width")
    y = NF.instance_norm(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, torch.nn.functional.instance_norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sliced_channels_last_depthwise_convolution(dtype):
    x = _sliced_channels_last("width").to(dtype)
    w = torch.randn(x.size(1), 1, 3, 3, dtype=dtype)
    for stride in (1, 2):
        y = torch.ops.normops.depthwise_conv3x3(x, w, stride)
        want = torch.nn.functional.conv2d(x, w, None, stride, 1, 1, x.size(1))
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y, want)
        torch.library.opcheck(torch.ops.normops.depthwise_conv3x3, (x, w, stride))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_parameter_dtypes_are_refused_as_torch_does(dtype):
    # Mixed precision takes float32 parameters or the input's dtype, one of
    # them for all: torch's CPU kernels raise for a mixture.
    x = torch.randn(4, 6, 5, dtype=dtype)
    w5, b5, w6, b6, rm, rv = (torch.rand(n) + 0.5 for n in (5, 5, 6, 6, 6, 6))
    calls = {
        "layer_norm": lambda F, a, b: F.layer_norm(x, (5,), w5.to(a), b5.to(b)),
        "group_norm": lambda F, a, b: F.group_norm(x, 2, w6.to(a), b6.to(b)),
        "batch_norm": lambda F, a, b: F.batch_norm(x, None, None, w6.to(a), b6.to(b), True),
        "batch_norm_eval": lambda F, a, b: F.batch_norm(x, rm.to(a), rv.to(b), w6, b6, False),
        "batch_norm_running": lambda F, a, b: F.batch_norm(x, rm.to(a).clone(), rv.to(b).clone(),
                                                           None, None, True),
    }
    for name, call in calls.items():
        for a, b in ((torch.float32, torch.float32), (dtype, dtype)):
            if name == "batch_norm_eval" and a != torch.float32:
                continue  # float32 weight and bias with these statistics: mixed
            assert_close(call(NF, a, b), call(torch.nn.functional, a, b), dtype)
        for a, b in ((torch.float32, dtype), (dtype, torch.float32)):
            with pytest.raises(RuntimeError):
                call(torch.nn.functional, a, b)
            with pytest.raises(RuntimeError, match="mixed precision"):
                call(NF, a, b)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("missing", ["running_mean", "running_var", "both"])
def test_missing_running_statistic_errors_as_torch(training, missing):
    x = torch.randn(4, 3)
    rm = None if missing in ("running_mean", "both") else torch.zeros(3)
    rv = None if missing in ("running_var", "both") else torch.ones(3)
    if training and missing == "both":
        return  # batch statistics: no error
    errors = []
    for F in (torch.nn.functional, NF):
        with pytest.raises((RuntimeError, ValueError)) as info:
            F.batch_norm(x, rm, rv, training=training)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("make", [lambda: normops.nn.BatchNorm2d(3), lambda: normops.nn.LayerNorm(3),
                                  lambda: normops.nn.GroupNorm(1, 3),
                                  lambda: normops.nn.InstanceNorm2d(3),
                                  lambda: normops.nn.InvertedResidual(3, 3, 1, 2),
                                  lambda: normops.convert(torch.nn.Sequential(
                                      torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3),
                                      torch.nn.ReLU()))])
def test_jit_script_is_refused_clearly(make):
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script"):
        torch.jit.script(make())
