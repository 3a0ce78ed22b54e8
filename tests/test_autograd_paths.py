"""The two ways autograd reaches an op's backward: a direct call of
torch.ops.normops.X goes through the torch.library registration; the Python
layer's eager calls (normops.ops._common.call) through the autograd.Function
built from the same setup_context and backward. Both must give the same
gradients, first and second order, and the eager path must be the one taken."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import normops  # noqa: F401
from normops.ops._common import call
from helpers import make_input

ops = torch.ops.normops


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def cases():
    """(op, args, indices of the differentiable args), float64, small."""
    x = make_input((3, 4, 3, 2), torch.float64, layout="channels_last", scale=2)
    w, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    for training in (True, False):
        for act in (0, 2):
            yield (f"batch_norm-train{training}-act{act}", ops.batch_norm,
                   [x, w, b, rm, rv, training, 1e-5, act], (0, 1, 2))
    yield "layer_norm", ops.layer_norm, [x, [3, 2], torch.randn(3, 2, dtype=torch.float64),
                                         torch.randn(3, 2, dtype=torch.float64), 1e-5], (0, 2, 3)
    yield "group_norm", ops.group_norm, [x, 2, w, b, 1e-5], (0, 2, 3)
    yield "depthwise_conv3x3", ops.depthwise_conv3x3, [x, torch.randn(4, 1, 3, 3,
                                                                     dtype=torch.float64), 2], (0, 1)
    hidden, oup = 8, 4
    r = lambda *s: torch.randn(*s, dtype=torch.float64) * 0.3  # noqa: E731
    yield "inverted_residual", ops.inverted_residual, [
        x, r(hidden, 4), r(hidden), r(hidden, 3, 3), r(hidden), r(oup, hidden), r(oup), 1,
        True], (0, 1, 2, 3, 4, 5, 6)


CASES = list(cases())


def _with_grad(args, diff):
    return [leaf(a) if i in diff else a for i, a in enumerate(args)]


def _first_output(fn, args, diff):
    def f(*tensors):
        full = list(args)
        for i, t in zip(diff, tensors):
            full[i] = t
        out = fn(*full)
        return out[0] if isinstance(out, (tuple, list)) else out
    return f


@pytest.mark.parametrize("name,op,args,diff", CASES, ids=[c[0] for c in CASES])
def test_eager_call_matches_registered_autograd(name, op, args, diff):
    args = _with_grad(args, diff)
    tensors = [args[i] for i in diff]
    direct = _first_output(op, args, diff)(*tensors)
    eager = _first_output(lambda *a: call(op, *a), args, diff)(*tensors)
    # The eager call is recorded by the Function, the direct one by torch.library.
    assert type(eager.grad_fn).__name__.endswith("_eagerBackward"), type(eager.grad_fn)
    assert not type(direct.grad_fn).__name__.endswith("_eagerBackward")
    torch.testing.assert_close(eager, direct, rtol=0, atol=0)
    g = torch.randn_like(direct)
    expected = torch.autograd.grad(direct, tensors, g, create_graph=True)
    got = torch.autograd.grad(eager, tensors, g, create_graph=True)
    for e, a in zip(expected, got):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    # Second order: both paths fall back to the same differentiable formula.
    gg = [torch.autograd.grad(t.sum(), tensors, allow_unused=True) for t in (expected[0], got[0])]
    for e, a in zip(*gg):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,op,args,diff", CASES, ids=[c[0] for c in CASES])
def test_registered_autograd_gradcheck(name, op, args, diff):
    """gradcheck and gradgradcheck through the torch.library registration
    (the functional tests go through the eager Function)."""
    args = _with_grad(args, diff)
    f = _first_output(op, args, diff)
    tensors = tuple(args[i] for i in diff)
    assert gradcheck(f, tensors)
    assert gradgradcheck(f, tensors)


class _Refused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        raise AssertionError("the eager autograd.Function was applied")


@pytest.mark.parametrize("records", [True, False])
def test_call_applies_the_function_only_when_a_graph_is_recorded(monkeypatch, records):
    from normops.ops import _common
    monkeypatch.setitem(_common._EAGER_FUNCTIONS, ops.group_norm, _Refused)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with torch.set_grad_enabled(records):
        if records:
            with pytest.raises(AssertionError, match="eager autograd.Function"):
                call(ops.group_norm, x, 2, None, None, 1e-5)
        else:
            assert call(ops.group_norm, x, 2, None, None, 1e-5)[0].grad_fn is None
    # Tracing records the op itself, with a graph to record or not.
    traced = torch.jit.trace(lambda t: call(ops.group_norm, t, 2, None, None, 1e-5)[0], (x,))
    assert "normops::group_norm" in str(traced.graph)


def test_jit_trace_and_save_a_module_with_parameters(tmp_path):
    """torch.jit.trace checks its trace by running it again under no_grad:
    the graph must hold the ops, not the eager autograd.Function."""
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), normops.nn.GroupNorm(2, 4),
                            normops.nn.BatchNorm2d(4).eval())
    x = torch.randn(2, 3, 6, 6)
    traced = torch.jit.trace(m, (x,))
    torch.jit.save(traced, tmp_path / "m.pt")
    torch.testing.assert_close(torch.jit.load(tmp_path / "m.pt")(x), m(x))


def test_autocast_keeps_the_registration_only_where_it_casts():
    """CUDA autocast casts layer and group norm's inputs: those calls keep
    torch.library's wrapper, which saves the cast inputs (the CUDA tests of
    test_autocast.py run them). CPU autocast casts none of the ops, so eager
    calls keep the Function there."""
    from normops.ops._common import autocast_rule_applies
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for op in (ops.layer_norm, ops.group_norm, ops.batch_norm):
            assert not autocast_rule_applies(op, "cpu")
        x = torch.randn(2, 4, 3, 3, requires_grad=True)
        out = call(ops.group_norm, x, 2, None, None, 1e-5)[0]
        assert type(out.grad_fn).__name__.endswith("_eagerBackward")
        assert out.dtype == torch.float32
