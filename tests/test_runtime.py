"""The build's run-time properties: CPU kernel builds (each tested through
NORMOPS_CPU_CAPABILITY in a subprocess), threads, saved tensors."""
import os
import subprocess
import sys

import pytest
import torch

import normops
from helpers import make_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = r"""
import itertools
import torch, normops, normops.functional as NF, torch.nn.functional as TF
from helpers import check_half_conversions
torch.manual_seed(0)
assert normops.cpu_capability() == "{cap}", normops.cpu_capability()
for dtype, layout in itertools.product((torch.float16, torch.bfloat16), ("planes", "rows")):
    check_half_conversions(dtype, layout)
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    tol = dict(rtol=1e-4, atol=1e-4) if dtype in (torch.float32, torch.float64) else dict(rtol=3e-2, atol=3e-2)
    # 12 channels: channels_last rows short enough for the period reductions
    # of every build; 20: the per-channel loops on AVX2 and the baseline.
    for cl, C in ((False, 20), (True, 20), (True, 12)):
        x = torch.randn(3, C, 7, 9, dtype=torch.float64)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        xl = x.to(dtype).requires_grad_()
        xr = x.to(dtype).double().requires_grad_()
        for f, g in ((lambda t: NF.batch_norm(t, None, None, training=True, activation="relu6"),
                      lambda t: TF.relu6(TF.batch_norm(t, None, None, training=True))),
                     (lambda t: NF.group_norm(t, 4), lambda t: TF.group_norm(t, 4)),
                     (lambda t: NF.layer_norm(t, (7, 9)), lambda t: TF.layer_norm(t, (7, 9)))):
            y, yr = f(xl), g(xr)
            torch.testing.assert_close(y.double(), yr, **tol)
            gy = torch.randn_like(yr)
            (a,) = torch.autograd.grad(y, xl, gy.to(dtype))
            (b,) = torch.autograd.grad(yr, xr, gy)
            torch.testing.assert_close(a.double(), b, **tol)
# The inverted residual's GEMM and depthwise tiles (hidden 45 and 96: a
# one-vector last panel, and chunks at batch 1; 240 on one thread, unsplit:
# the depthwise row in channel order), NCHW and channels_last.
from normops.ops.inverted_residual import reference
for dtype in (torch.float32, torch.float64):
    for (cin, cout, s, t, n) in ((15, 15, 1, 3, 2), (16, 24, 2, 6, 1), (40, 40, 1, 6, 2)):
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if cin == 40 else threads)
        hid = cin * t
        w = [torch.randn(hid, cin, dtype=dtype) * 0.3, torch.randn(hid, dtype=dtype),
             torch.randn(hid, 3, 3, dtype=dtype) * 0.3, torch.randn(hid, dtype=dtype),
             torch.randn(cout, hid, dtype=dtype) * 0.1, torch.randn(cout, dtype=dtype)]
        for cl in (False, True):
            x = torch.randn(n, cin, 9, 7, dtype=dtype)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            args = (x, *w, s, s == 1 and cin == cout)
            torch.testing.assert_close(torch.ops.normops.inverted_residual(*args),
                                       reference(*args), rtol=1e-4, atol=1e-4)
        torch.set_num_threads(threads)
# The training depthwise convolution: vector bodies and scalar edges (37
# channels, 19 columns), channels_last's channel order (245 channels, 70
# columns: two column blocks; 20 channels, few enough for it too), both
# strides and layouts.
for dtype, s, cl, (C, W) in itertools.product((torch.float32, torch.float64), (1, 2),
                                               (False, True), ((37, 19), (245, 70), (20, 19))):
    x = torch.randn(2, C, 11, W, dtype=dtype, requires_grad=True)
    w = torch.randn(C, 1, 3, 3, dtype=dtype, requires_grad=True)
    xin = x.to(memory_format=torch.channels_last) if cl else x
    y = torch.ops.normops.depthwise_conv3x3(xin, w, s)
    yr = TF.conv2d(x, w, None, s, 1, 1, C)
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-4)
    gy = torch.randn_like(yr)
    for a, b in zip(torch.autograd.grad(y, (x, w), gy), torch.autograd.grad(yr, (x, w), gy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # With an input norm (ReLU6 of a batch norm), applied as the rows are read.
    mean, var = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5
    a = TF.relu6((x.detach() - mean[:, None, None]) * (var[:, None, None] + 1e-5).rsqrt())
    y = torch.ops.normops.depthwise_conv3x3(xin.detach(), w.detach(), s, mean, var, None, None,
                                            1e-5, 2)
    torch.testing.assert_close(y, TF.conv2d(a, w.detach(), None, s, 1, 1, C), rtol=1e-4,
                               atol=1e-4)
# Rows of several two-pass statistics blocks and a partial one.
for dtype in (torch.float32, torch.float64):
    x = torch.randn(3, 2 * 4096 + 37, dtype=dtype) * 2 + 100
    torch.testing.assert_close(NF.layer_norm(x, (x.size(-1),)).double(),
                               TF.layer_norm(x.double(), (x.size(-1),)), rtol=1e-4, atol=1e-4)
print("ok")
"""


# Every op that writes through write_output (csrc/cpu/common.h), forward and
# backward, with runs, rows and pieces of many sizes and alignments. Run with
# NORMOPS_STREAMING_STORES=1 (every output through the buffer and
# non-temporal stores) and =0 (plain stores): the results must be identical.
STREAMING_CHECK = r"""
import sys
import torch, normops.functional as NF
torch.manual_seed(0)
torch.set_num_threads(2)
out = []
def run(f, x, *params):
    x = x.detach().requires_grad_()
    y = f(x, *params)
    gy = torch.randn_like(y)
    out.append(y)
    out.extend(torch.autograd.grad(y, (x, *params), gy))
def param(C, dtype=torch.float32):
    return torch.randn(C, dtype=dtype).requires_grad_()
def cl(x):
    return x.contiguous(memory_format=torch.channels_last)
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    for shape in ((4, 6, 17, 19), (4, 1, 17, 19), (2, 37, 9, 11), (2, 5000, 1, 3)):
        for layout in (lambda t: t, cl):
            x = layout(torch.randn(shape).to(dtype))
            for act in (None, "relu6"):
                run(lambda t, w, b: NF.batch_norm(t, None, None, w, b, True, activation=act),
                    x, param(shape[1], pd), param(shape[1], pd))
    for shape, G in (((2, 12, 9, 11), 4), ((1, 4, 70, 70), 2), ((1, 6, 30, 30), 1)):
        for layout in (lambda t: t, cl):
            x = layout(torch.randn(shape).to(dtype))
            run(lambda t, w, b: NF.group_norm(t, G, w, b), x, param(shape[1], dtype),
                param(shape[1], dtype))
            run(lambda t: NF.instance_norm(t), x)
    for shape in ((37, 5000), (300, 130), (3, 17001)):
        x = torch.randn(shape).to(dtype)
        run(lambda t, w, b: NF.layer_norm(t, shape[1:], w, b), x, param(shape[1], dtype),
            param(shape[1], dtype))
        run(lambda t: NF.layer_norm(t, shape[1:]), x)
torch.save(out, sys.argv[1])
print("ok")
"""


@pytest.mark.parametrize("cap", ["default", "avx2", "avx512"])
def test_streamed_outputs_equal_plain_stores(tmp_path, cap):
    if cap not in available_capabilities():
        pytest.skip(f"this CPU has no {cap}")
    results = []
    for mode in ("1", "0"):
        path = tmp_path / f"streaming{mode}.pt"
        env = dict(os.environ, NORMOPS_STREAMING_STORES=mode, NORMOPS_CPU_CAPABILITY=cap,
                   PYTHONPATH=ROOT)
        r = subprocess.run([sys.executable, "-c", STREAMING_CHECK, str(path)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
        results.append(torch.load(path))
    assert len(results[0]) == len(results[1]) > 100
    for i, (a, b) in enumerate(zip(*results)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), i
        assert torch.equal(a, b), f"result {i} differs"


def available_capabilities():
    best = normops.cpu_capability()
    order = ["default", "avx2", "avx512"]
    return order[: order.index(best) + 1]


@pytest.mark.parametrize("cap", ["default", "avx2", "avx512"])
def test_every_cpu_build(cap):
    if cap not in available_capabilities():
        pytest.skip(f"this CPU has no {cap}")
    env = dict(os.environ, NORMOPS_CPU_CAPABILITY=cap,
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    r = subprocess.run([sys.executable, "-c", CHECK.replace("{cap}", cap)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_results_do_not_depend_on_thread_count():
    x = make_input((8, 16, 20, 20), layout="channels_last")
    outs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, max(2, threads)):
            torch.set_num_threads(t)
            outs.append(torch.ops.normops.batch_norm_stats(x))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make,shape", [
    (lambda: normops.nn.BatchNormAct2d(4, activation="relu6"), (2, 4, 3, 3)),
    (lambda: normops.nn.LayerNorm(6), (3, 6)),
    (lambda: normops.nn.GroupNorm(2, 4), (2, 4, 3, 3)),
])
def test_backward_state_goes_through_saved_tensor_hooks(make, shape):
    """Everything the backward needs is saved with save_for_backward, so
    saved-tensor hooks (save_on_cpu, offloading) see all of it."""
    m = make()
    x = torch.randn(shape, requires_grad=True)
    packed = []

    def pack(t):
        packed.append(t)
        return ("packed", t.clone())

    def unpack(p):
        return p[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = m(x)
    assert any(t.shape == x.shape for t in packed)
    y.sum().backward()
    ref = torch.autograd.grad(m(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, ref)
    with torch.autograd.graph.save_on_cpu():
        m(x).sum().backward()
