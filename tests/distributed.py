"""Runs a function on several processes joined in a gloo process group over
loopback: a free port chosen at run time, a bounded time, the group torn
down on every rank whatever happens.

run_ranks(fn, size, *args) calls fn(rank, size, *args) on each rank and
returns, per rank, ("ok", value) or ("error", "<Type>: message"); it fails the
test if a rank does not finish within the time limit (a hang)."""
import datetime
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, size, port, results, fn, args, collective_timeout_s):
    # One thread per rank: the ranks share this machine's cores.
    torch.set_num_threads(1)
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
            timeout=datetime.timedelta(seconds=collective_timeout_s))
        try:
            results.put((rank, "ok", fn(rank, size, *args)))
        except Exception as e:  # reported to the parent, which asserts on it
            results.put((rank, "error", f"{type(e).__name__}: {e}",
                         traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, size, *args, timeout_s=180, collective_timeout_s=60):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, size, port, results, fn, args,
                                                collective_timeout_s), daemon=True)
             for r in range(size)]
    for p in procs:
        p.start()
    out = {}
    try:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        while len(out) < size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                raise AssertionError(
                    f"ranks {sorted(set(range(size)) - set(out))} did not finish within "
                    f"{timeout_s} s (hung?)")
            try:
                item = results.get(timeout=min(left, 5))
            except queue.Empty:
                crashed = {r: p.exitcode for r, p in enumerate(procs)
                           if r not in out and p.exitcode not in (0, None)}
                if crashed:
                    raise AssertionError(f"ranks crashed (exit codes): {crashed}")
                continue
            out[item[0]] = item[1:]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(size)]


def ok_values(results):
    """The ranks' return values, failing with every rank's traceback if one
    raised."""
    errors = [f"rank {r}:\n{res[2]}" for r, res in enumerate(results) if res[0] != "ok"]
    assert not errors, "\n".join(errors)
    return [res[1] for res in results]
