"""DistributedDataParallel (gloo, 2 ranks, CPU) over models that use normops
modules trains as the same model on torch.nn modules."""
import copy

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import normops
from distributed import ok_values, run_ranks

STEPS = 3
BATCH = 4  # per rank


def _model():
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU6(),
        nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4),
    ).double()


def _batches(size):
    """The global batches of every step, the same on every rank."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH * size, 3, 6, 5, dtype=torch.float64, generator=g)
            .contiguous(memory_format=torch.channels_last) for _ in range(STEPS)]


def _train(model, batches, rows):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x in batches:
        opt.zero_grad()
        model(x[rows]).square().mean().backward()
        opt.step()


def _compare(ours, ref, skip=()):
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        if name.startswith(skip):
            continue
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(a, b), name


def _ddp_normops_vs_torch(rank, size):
    ref = _model()
    ours = normops.convert(copy.deepcopy(ref))
    assert type(ours[1]) is normops.nn.BatchNormAct2d
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    _train(DDP(ref), _batches(size), rows)
    _train(DDP(ours), _batches(size), rows)
    _compare(ours, ref)


def test_ddp_with_normops_modules_trains_as_torch_nn():
    ok_values(run_ranks(_ddp_normops_vs_torch, 2))


def _ddp_sync_vs_one_process(rank, size):
    ref = _model()
    ours = normops.nn.SyncBatchNorm.convert_sync_batchnorm(normops.convert(copy.deepcopy(ref)))
    assert type(ours[1]) is normops.nn.SyncBatchNorm and ours[1].activation == "relu"
    batches = _batches(size)
    # Even shards and a mean loss: DDP's averaged gradient is the global batch's.
    _train(DDP(ours), batches, slice(rank * BATCH, (rank + 1) * BATCH))
    _train(ref, batches, slice(None))
    # InstanceNorm's running statistics are per rank (DDP broadcasts rank 0's).
    _compare(ours, ref, skip=("6.running",))


def test_ddp_with_sync_batch_norm_trains_as_one_process_on_the_global_batch():
    ok_values(run_ranks(_ddp_sync_vs_one_process, 2))
