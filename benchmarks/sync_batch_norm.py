"""What synchronising batch norm over gloo costs on this machine.

    python -m benchmarks.sync_batch_norm [--ranks 2] [--threads 1] [--out DIR]

Spawns `--ranks` processes joined by gloo over loopback; every rank holds
its share of a global batch (the ResNet-50 and MobileNetV2 batch-norm shapes
of shapes.json at global batch 32, NCHW and channels_last) and times one
training step (forward + backward of the layer) of:

- `torch_local`: torch.nn.BatchNorm2d on the rank's rows: per-rank
  statistics, the only thing torch offers on CPU (its SyncBatchNorm refuses
  CPU tensors);
- `normops_local`: normops.nn.BatchNorm2d, per-rank statistics;
- `normops_sync`: normops.nn.SyncBatchNorm, statistics of the global batch
  (one all_gather forward, one all_reduce backward).

The ranks start each sample together (a barrier, not timed); a sample is the
slowest rank's time, as a step waits for it. `sync overhead` is
normops_sync - normops_local: the collectives and their waiting. Medians of
interleaved samples, inputs rotated over > 256 MB per rank so the caches do
not hold them.
"""
import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14),
          (32, 144, 56, 56), (32, 960, 7, 7)]
IMPLS = ("torch_local", "normops_local", "normops_sync")
SAMPLES = 15
ROTATION_BYTES = 256 * 2**20


def _modules(C):
    import normops
    return {"torch_local": torch.nn.BatchNorm2d(C), "normops_local": normops.nn.BatchNorm2d(C),
            "normops_sync": normops.nn.SyncBatchNorm(C)}


def _time_step(module, x, dy):
    dist.barrier()
    t0 = time.perf_counter()
    y = module(x)
    torch.autograd.grad(y, (x, module.weight, module.bias), dy)
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step waits for the slowest rank
    return elapsed.item()


def _rank_main(rank, size, port, threads, results):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=datetime.timedelta(seconds=300))
    rows = []
    for shape in SHAPES:
        for layout in ("nchw", "channels_last"):
            N = shape[0] // size
            local = (N,) + shape[1:]
            bytes_ = 4 * N * shape[1] * shape[2] * shape[3]
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            pool = [(torch.randn(local).contiguous(memory_format=fmt).requires_grad_(),
                     torch.randn(local).contiguous(memory_format=fmt))
                    for _ in range(max(2, ROTATION_BYTES // (2 * bytes_)))]
            modules = _modules(shape[1])
            times = {impl: [] for impl in IMPLS}
            for i in range(SAMPLES + 2):  # 2 warm-up rounds
                order = IMPLS if i % 2 == 0 else IMPLS[::-1]
                for impl in order:
                    t = _time_step(modules[impl], *pool[i % len(pool)])
                    if i >= 2:
                        times[impl].append(t)
            med = {impl: sorted(t)[len(t) // 2] * 1e3 for impl, t in times.items()}
            rows.append({"shape": list(shape), "layout": layout, "ranks": size,
                         "threads_per_rank": threads, **{f"{k}_ms": v for k, v in med.items()}})
            del pool
    if rank == 0:
        results.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sync_batch_norm",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, args.ranks, port, args.threads, results))
             for r in range(args.ranks)]
    for proc in procs:
        proc.start()
    rows = results.get()
    for proc in procs:
        proc.join()
    head = (f"{'shape (global)':>22} {'layout':>13} {'torch local':>12} {'normops local':>14} "
            f"{'normops sync':>13} {'sync overhead':>14} {'sync x torch':>13}")
    print(f"{args.ranks} gloo ranks x {args.threads} thread(s), fwd+bwd per step, median ms")
    print(head)
    for r in rows:
        overhead = r["normops_sync_ms"] - r["normops_local_ms"]
        r["sync_overhead_ms"] = overhead
        r["sync_vs_torch_local"] = r["torch_local_ms"] / r["normops_sync_ms"]
        print(f"{'x'.join(map(str, r['shape'])):>22} {r['layout']:>13} {r['torch_local_ms']:12.2f} "
              f"{r['normops_local_ms']:14.2f} {r['normops_sync_ms']:13.2f} "
              f"{overhead:9.2f} ({overhead / r['normops_local_ms']:4.0%}) "
              f"{r['sync_vs_torch_local']:12.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "sync_batch_norm.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
