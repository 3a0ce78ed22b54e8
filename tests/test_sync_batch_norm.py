"""normops.nn.SyncBatchNorm on gloo (CPU): every rank's slice of a global
batch against torch.nn.BatchNorm2d on the whole batch in one process."""
import itertools

import pytest
import torch
import torch.distributed as dist

import normops
from distributed import ok_values, run_ranks
from helpers import assert_close, make_input, needs_bn_bias_arg, step_and_compare

C = 5
SPATIAL = (4, 3)
# Rows of the global batch held by each rank; "empty" gives one rank nothing.
SPLITS = {
    2: {"even": [4, 4], "uneven": [6, 1], "empty": [0, 5]},
    3: {"even": [3, 3, 3], "uneven": [4, 1, 2], "empty": [3, 0, 4]},
}
ACT = {None: lambda y: y, "relu": torch.relu, "relu6": torch.nn.functional.relu6}


def _case(dtype, layout, split, activation=None, affine=True, momentum=0.1):
    return dtype, layout, split, activation, affine, momentum


CASES = [_case(*c) for c in itertools.product(
    (torch.float64, torch.float32), ("contiguous", "channels_last"), ("even", "uneven", "empty"))]
CASES += [
    _case(torch.float32, "contiguous", "uneven", "relu6"),
    _case(torch.float64, "channels_last", "empty", "relu"),
    _case(torch.float64, "strided", "uneven"),
    _case(torch.float32, "channels_last", "even", affine=False),
    _case(torch.float64, "contiguous", "uneven", momentum=None),
]


def case_id(case):
    dtype, layout, split, activation, affine, momentum = case
    parts = [str(dtype).replace("torch.", ""), layout, split]
    parts += [activation] if activation else []
    parts += [] if affine else ["no_affine"]
    parts += [] if momentum is not None else ["cumulative"]
    return "-".join(parts)


def _compare_case(rank, size, case):
    dtype, layout, split, activation, affine, momentum = case
    sizes = SPLITS[size][split]
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    torch.manual_seed(0)  # the same global batch and parameters on every rank
    ours = normops.nn.SyncBatchNorm(C, momentum=momentum, affine=affine, activation=activation,
                                    dtype=dtype)
    ref = torch.nn.BatchNorm2d(C, momentum=momentum, affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            for p in (ours.weight, ours.bias):
                p.copy_(torch.randn(C, dtype=dtype))
        ref.load_state_dict(ours.state_dict())
    for _ in range(2):
        x = make_input((sum(sizes), C) + SPATIAL, dtype, layout=layout, offset=3.0)
        g = torch.randn(x.shape, dtype=dtype)
        xr = x.detach().clone().requires_grad_()
        yr = ACT[activation](ref(xr))
        yr.backward(g)
        xo = x[start:stop].detach().clone().requires_grad_()
        yo = ours(xo)
        yo.backward(g[start:stop])
        assert_close(yo, yr[start:stop])
        if layout == "channels_last" and stop > start:
            assert yo.is_contiguous(memory_format=torch.channels_last)
        assert_close(xo.grad, xr.grad[start:stop], grad=True)
        if affine:
            # Parameter gradients stay per rank; their sum is the global one.
            for po, pr in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
                total = po.grad.clone()
                dist.all_reduce(total)
                assert_close(total, pr.grad, grad=True)
                po.grad, pr.grad = None, None
        for bo, br in zip(ours.buffers(), ref.buffers()):
            if bo.is_floating_point():
                assert_close(bo, br)
            else:
                assert torch.equal(bo, br)


def _all_cases(rank, size):
    failures = {}
    for case in CASES:
        try:
            _compare_case(rank, size, case)
        except Exception as e:  # every case reports; the test per case asserts
            failures[case_id(case)] = f"{type(e).__name__}: {e}"
    return failures


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def rank_failures(request):
    return request.param, ok_values(run_ranks(_all_cases, request.param))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_batch_norm_on_global_batch(rank_failures, case):
    size, failures = rank_failures
    found = {r: f[case_id(case)] for r, f in enumerate(failures) if case_id(case) in f}
    assert not found, found


def _one_rank_bad_input(rank, size, kind):
    m = normops.nn.SyncBatchNorm(C)
    x = torch.randn(4, C + (rank == 1), 3, 3)
    if kind == "1d" and rank == 1:
        x = torch.randn(C)
    try:
        m(x)
    except Exception as e:
        untouched = (torch.equal(m.running_mean, torch.zeros(C))
                     and torch.equal(m.running_var, torch.ones(C))
                     and int(m.num_batches_tracked) == 0)
        return type(e).__name__, str(e), untouched
    return None


@pytest.mark.parametrize("kind", ["channels", "1d"])
def test_bad_input_on_one_rank_raises_on_every_rank(kind):
    results = ok_values(run_ranks(_one_rank_bad_input, 3, kind, timeout_s=120))
    assert all(r is not None for r in results), results
    error, msg, untouched = results[1]
    if kind == "channels":
        assert error == "RuntimeError" and f"expected input with {C} channels" in msg
    else:
        assert error == "ValueError" and "expected at least 2D input (got 1D input)" in msg
    for r in (0, 2):
        assert results[r][0] == "RuntimeError" and "failed on rank(s) [1]" in results[r][1]
    assert all(r[2] for r in results), "a failed call moved the running statistics"


def _eval_and_one_rank_only(rank, size):
    torch.manual_seed(0)
    m = normops.nn.SyncBatchNorm(C)
    with torch.no_grad():
        m.running_mean.uniform_()
        m.running_var.uniform_(0.5, 2)
    m.eval()
    if rank == 0:  # no collective in eval: rank 1 never joins, and nothing waits for it
        x = torch.randn(3, C, 2, 2)
        ref = torch.nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias)
        assert_close(m(x), ref)
    m.train()
    y = m(torch.randn(2 + rank, C, 2, 2))  # and the group still works afterwards
    return y.shape[0]


def test_eval_mode_does_not_synchronise():
    assert ok_values(run_ranks(_eval_and_one_rank_only, 2)) == [2, 3]


def _world_of_one(rank, size):
    torch.manual_seed(0)
    x = make_input((4, C, 3, 3), layout="channels_last")
    step_and_compare(normops.nn.SyncBatchNorm(C, activation="relu"), torch.nn.BatchNorm2d(C),
                     x, act=torch.relu)


def test_world_of_one_rank_is_batch_norm():
    ok_values(run_ranks(_world_of_one, 1))


def test_without_process_group_is_batch_norm():
    assert not dist.is_initialized()
    x = make_input((4, C, 3, 3))
    step_and_compare(normops.nn.SyncBatchNorm(C, momentum=None), torch.nn.BatchNorm2d(C, momentum=None), x)
    ours, ref = normops.nn.SyncBatchNorm(C).eval(), torch.nn.BatchNorm2d(C).eval()
    step_and_compare(ours, ref, x)


@needs_bn_bias_arg
def test_constructor_without_bias():
    assert normops.nn.SyncBatchNorm(C, bias=False).bias is None


def test_constructor_and_state_dict_match_torch():
    ours, ref = normops.nn.SyncBatchNorm(C, eps=1e-3, momentum=0.2), torch.nn.SyncBatchNorm(C, 1e-3, 0.2)
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    # Not a torch.nn.SyncBatchNorm: DDP would refuse it on CPU.
    assert not isinstance(ours, torch.nn.SyncBatchNorm)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match="activation"):
        normops.nn.SyncBatchNorm(C, activation="gelu")
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(C))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        normops.nn.SyncBatchNorm(0)(torch.randn(2, 0, 3))


def test_convert_sync_batchnorm():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.SyncBatchNorm(4), normops.nn.BatchNorm2d(4)),
        torch.nn.BatchNorm1d(4, affine=False), torch.nn.LayerNorm(4))
    normops.convert(model)  # 1, 2 -> BatchNormAct2d + Identity
    model.eval()
    weights = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    group = object()
    converted = normops.nn.SyncBatchNorm.convert_sync_batchnorm(model, group)
    assert converted is model
    for name in ("1", "3.0", "3.1", "4"):
        m = model.get_submodule(name)
        assert type(m) is normops.nn.SyncBatchNorm and m.process_group is group and not m.training
    assert model[1].activation == "relu" and model[3][0].activation is None
    assert model[4].weight is None and model[4].running_mean is buffers["4.running_mean"]
    assert all(p is weights[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert type(model[5]) is normops.nn.LayerNorm
    single = normops.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm3d(2, bias=False))
    assert type(single) is normops.nn.SyncBatchNorm and single.bias is None
