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
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import normops.functional as NF

EPS = 1e-5
CASES = {  # family: (shape, normops step, ATen step)
    "bn": ((32, 256, 56, 56),
           lambda x, w, b, rm, rv: NF.batch_norm(x, rm, rv, w, b, True, 0.1, EPS),
           lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, True, 0.1, EPS)),
    "bn_relu6": ((32, 144, 56, 56),
                 lambda x, w, b, rm, rv: NF.batch_norm(x, rm, rv, w, b, True, 0.1, EPS,
                                                       activation="relu6"),
                 lambda x, w, b, rm, rv: F.relu6(F.batch_norm(x, rm, rv, w, b, True, 0.1, EPS))),
    "ln": ((8192, 4096),
           lambda x, w, b, rm, rv: NF.layer_norm(x, x.shape[-1:], w, b, EPS),
           lambda x, w, b, rm, rv: F.layer_norm(x, x.shape[-1:], w, b, EPS)),
    "in": ((8, 64, 128, 128),
           lambda x, w, b, rm, rv: NF.instance_norm(x, None, None, w, b, True, 0.1, EPS),
           lambda x, w, b, rm, rv: F.instance_norm(x, None, None, w, b, True, 0.1, EPS)),
    "gn": ((32, 512, 28, 28),
           lambda x, w, b, rm, rv: NF.group_norm(x, 32, w, b, EPS),
           lambda x, w, b, rm, rv: F.group_norm(x, 32, w, b, EPS)),
}


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
    for family, (shape, ours, theirs) in CASES.items():
        layouts = ["rows"] if len(shape) == 2 else ["NCHW", "NHWC"]
        for layout in layouts:
            fmt = {"memory_format": torch.channels_last} if layout == "NHWC" else {}
            x = torch.randn(shape, device="cuda").to(dtype=dtype, **fmt).requires_grad_()
            dy = torch.randn_like(x)
            C = shape[-1] if len(shape) == 2 else shape[1]
            # float32 parameters for batch norm (AMP), the input's dtype otherwise
            pdt = torch.float32 if family.startswith("bn") else dtype
            w = (torch.rand(C, device="cuda") + 0.5).to(pdt).requires_grad_()
            b = torch.randn(C, device="cuda").to(pdt).requires_grad_()
            rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
            for impl, fn in (("normops", ours), ("aten", theirs)):
                def step():
                    torch.autograd.grad(fn(x, w, b, rm, rv), (x, w, b), dy)
                n, dev, wall = step_stats(step)
                print(f"{family:>9} {'x'.join(map(str, shape)):>17} {layout:>6} {impl:>8} "
                      f"{n:8.1f} {dev * 1e3:10.3f} {wall * 1e3:8.3f}")


if __name__ == "__main__":
    main()
