"""Where a CUDA step's time goes: for each op family on one representative
shape, normops against ATen, one training step (forward + backward) in each
of NCHW and channels_last, profiled with torch.profiler:

    python -m benchmarks.cuda_launches [--dtype float32|bfloat16|float16]

prints, per step, the kernels launched, their summed device time (what the
GPU works) and the wall time of a step run back to back (what a user waits,
with the host's launch overhead). Where the wall time is far above the
device time, the step is bound by the host, not by the kernels.
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.run import BUILDERS

CASES = [  # family, shape, builder arguments: one representative shape each
    ("bn", (32, 256, 56, 56), {}),
    ("bn_relu6", (32, 144, 56, 56), {}),
    ("ln", (8192, 4096), {}),
    ("in", (8, 64, 128, 128), {}),
    ("gn", (32, 512, 28, 28), {"groups": 32}),
]


def step_stats(step, reps=20):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / reps
    return len(kernels) / reps, device_s, wall


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype} inputs; "
          "per training step (forward + backward)")
    print(f"{'op':>9} {'shape':>17} {'layout':>6} {'impl':>8} {'kernels':>8} {'device ms':>10} "
          f"{'wall ms':>8}")
    for family, shape, kwargs in CASES:
        layouts = ["rows"] if len(shape) == 2 else ["NCHW", "NHWC"]
        for layout in layouts:
            fmt = {"memory_format": torch.channels_last} if layout == "NHWC" else {}
            x = torch.randn(shape, device="cuda").to(dtype=dtype, **fmt).requires_grad_()
            dy = torch.randn_like(x)
            params, make = BUILDERS[family](shape, "cuda", dtype, **kwargs)
            for impl in ("normops", "aten"):
                fn = make(impl)

                def step():
                    torch.autograd.grad(fn(x), (x, *params), dy)
                n, dev, wall = step_stats(step)
                print(f"{family:>9} {'x'.join(map(str, shape)):>17} {layout:>6} {impl:>8} "
                      f"{n:8.1f} {dev * 1e3:10.3f} {wall * 1e3:8.3f}")


if __name__ == "__main__":
    main()
