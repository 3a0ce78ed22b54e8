"""Benchmark the fused MobileNetV2 inverted residual against the torch.nn block.

    python -m benchmarks.inverted_residual [--full] [--threads N] [--compile]
                                           [--no-network] [--device cpu|cuda] [--out DIR]

For MobileNetV2 blocks (shapes.json; the quick default takes three of them,
--full all twelve) at batch 1 and 32, 224x224 network input, NCHW and
channels_last, float32, in one process with the participants interleaved:

- eval forward: normops.nn.InvertedResidual (one fused op) against the eager
  torch.nn block (unfolded batch norms, as users run it), the same block with
  the batch norms folded into the convolutions by hand, and (--compile)
  torch.compile of the eager block;
- training forward + backward: normops (memory_efficient, the default, and
  memory_efficient=False) against the eager block, with the bytes each
  forward saves for the backward (saved_tensors_hooks).

Then the whole network (normops.models.mobilenet_v2 against torchvision's
layout on torch.nn, tests/reference_models.py): eval forward at batch 1 and
32, and one training step at batch 32, whose peak resident memory is measured
in a fresh subprocess per model (its peak resident size, VmHWM, minus the
resident size before the step). Medians; `x eager` > 1 means normops is faster.

--device cuda times with CUDA events and measures the network's peak with
torch.cuda.max_memory_allocated; there normops trains on its batch-norm
kernels and torch's convolutions, and evaluates through the submodules (the
fused eval op is CPU only), so its eval column shows what folding by hand
would gain.
"""
import sys

if __name__ == "__main__":  # before torch is imported: glibc reads these at startup
    from benchmarks._malloc import reexec_with_malloc_env
    reexec_with_malloc_env()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import normops  # noqa: E402
from benchmarks._malloc import MALLOC_ENV  # noqa: E402
from benchmarks.run import QUICK, FULL, make_timer, measure  # noqa: E402
from normops.inverted_residual import _fold, block_stages  # noqa: E402
from normops.ops.inverted_residual import reference as folded_block  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import reference_models  # noqa: E402

QUICK_BLOCKS = [(24, 24, 1, 6, 56, 56), (32, 64, 2, 6, 28, 28), (160, 160, 1, 6, 7, 7)]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def _blocks(cfg, device):
    torch.manual_seed(0)
    ref = reference_models.randomize_norms(reference_models.InvertedResidual(*cfg))
    ours = normops.nn.InvertedResidual(*cfg)
    ours.load_state_dict(ref.state_dict())
    keep = normops.nn.InvertedResidual(*cfg, memory_efficient=False)
    keep.load_state_dict(ref.state_dict())
    return ours.to(device), keep.to(device), ref.to(device)


def _hand_folded(block):
    stages, stride = block_stages(block.conv)
    with torch.no_grad():
        weights = [w for pair in stages
                   for w in ((None, None) if pair is None else _fold(*pair))]
    return lambda x: folded_block(x, *weights, stride, block.use_res_connect)


def _train_step(module, x, g):
    def step(_):
        xi = x.detach().requires_grad_()
        y = module(xi)
        torch.autograd.grad(y, [xi] + list(module.parameters()), g)
    return step


def run_block(cfg, batch, layout, sampling, timer, with_compile, device="cpu"):
    inp, oup, stride, t, H, W = cfg
    ours, keep, ref = _blocks((inp, oup, stride, t), device)
    x = torch.randn(batch, inp, H, W, device=device).contiguous(memory_format=LAYOUTS[layout])
    flops = batch * (H * W * inp * inp * t * 2 * (t != 1)
                     + (H // stride) * (W // stride) * inp * t * (18 + 2 * oup))
    rows = []
    for m in (ours, keep, ref):
        m.eval()
    with torch.no_grad():
        steps = {"normops": lambda _: ours(x), "eager": lambda _: ref(x),
                 "folded": (lambda f: lambda _: f(x))(_hand_folded(ref))}
        if with_compile:
            torch._dynamo.reset()  # a fresh cache per block: else Dynamo's recompile limit
            compiled = torch.compile(ref)  # falls back to eager after 8 blocks
            t0 = time.perf_counter()
            compiled(x)
            log(f"    compile {time.perf_counter() - t0:.1f}s")
            steps["compile"] = lambda _: compiled(x)
        times = measure(steps, timer, sampling)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    rows.append({"pass": "eval", **{f"{k}_ms": v for k, v in med.items()},
                 "x_eager": med["eager"] / med["normops"],
                 "x_folded": med["folded"] / med["normops"],
                 "normops_gflops": flops / med["normops"] / 1e6})
    for m in (ours, keep, ref):
        m.train()
    g = torch.randn(ref(x).shape, device=device).contiguous(memory_format=LAYOUTS[layout])
    times = measure({"normops": _train_step(ours, x, g), "normops_keep": _train_step(keep, x, g),
                     "eager": _train_step(ref, x, g)}, timer, sampling)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    xg = x.detach().requires_grad_()
    saved = {k: reference_models.saved_activation_bytes(m, xg) for k, m in
             (("normops", ours), ("normops_keep", keep), ("eager", ref))}
    rows.append({"pass": "train", **{f"{k}_ms": v for k, v in med.items()},
                 "x_eager": med["eager"] / med["normops"],
                 "x_eager_keep": med["eager"] / med["normops_keep"],
                 **{f"{k}_saved_mb": v / 2**20 for k, v in saved.items()},
                 "saved_ratio": saved["normops"] / saved["eager"],
                 "input_mb": x.numel() * 4 / 2**20})
    for r in rows:
        r.update({"block": f"{inp}->{oup} s{stride} t{t} {H}x{W}", "batch": batch,
                  "layout": layout})
    return rows


_PEAK = """
import sys, torch
sys.path.insert(0, {tests!r})
import normops, reference_models
torch.set_num_threads({threads})
torch.manual_seed(0)
model = normops.models.mobilenet_v2() if {ours} else reference_models.MobileNetV2()
x = torch.randn({batch}, 3, 224, 224).contiguous(memory_format=torch.channels_last)
def status(field):  # this process's own peak (ru_maxrss would start at the parent's)
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = status("VmRSS:")
model(x).sum().backward()
print(status("VmHWM:") - before)
"""


def peak_train_memory(ours: bool, batch: int, threads: int) -> float:
    code = _PEAK.format(tests=str(HERE.parent / "tests"), threads=threads, ours=ours,
                        batch=batch)
    # glibc's defaults, as users run: the benchmark's MALLOC_* settings keep
    # every freed block in the heap and hide the difference in peaks.
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=HERE.parent, env=env)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def peak_cuda_train_memory(model, x) -> float:
    """The training step's peak of allocated CUDA memory above what was
    allocated before it, MB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(x).sum().backward()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_network(sampling, timer, threads, device="cpu"):
    torch.manual_seed(0)
    ref = reference_models.randomize_norms(reference_models.MobileNetV2())
    ours = normops.models.mobilenet_v2()
    ours.load_state_dict(ref.state_dict())
    ours, ref = ours.to(device), ref.to(device)
    rows = []
    for batch in (1, 32):
        x = torch.randn(batch, 3, 224, 224, device=device).contiguous(
            memory_format=torch.channels_last)
        ours.eval(), ref.eval()
        with torch.no_grad():
            times = measure({"normops": lambda _: ours(x), "eager": lambda _: ref(x)}, timer,
                            sampling)
        med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
        rows.append({"pass": "eval", "batch": batch, **{f"{k}_ms": v for k, v in med.items()},
                     "x_eager": med["eager"] / med["normops"]})
    x = torch.randn(32, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    ours.train(), ref.train()
    times = measure({"normops": lambda _: ours(x).sum().backward(),
                     "eager": lambda _: ref(x).sum().backward()}, timer,
                    type(sampling)(1, 3, 5, 1.0))
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    if device == "cuda":
        peak = {"normops": peak_cuda_train_memory(ours, x), "eager": peak_cuda_train_memory(ref, x)}
    else:
        peak = {k: peak_train_memory(k == "normops", 32, threads) for k in ("normops", "eager")}
    rows.append({"pass": "train", "batch": 32, "device": device,
                 **{f"{k}_ms": v for k, v in med.items()},
                 "x_eager": med["eager"] / med["normops"],
                 **{f"{k}_peak_mb": v for k, v in peak.items()},
                 "peak_ratio": peak["normops"] / peak["eager"]})
    return rows


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def print_tables(rows, network):
    print(f"{'block':>24} {'N':>3} {'layout':>13} {'eval ms':>8} {'eager':>7} {'folded':>7} "
          f"{'compile':>7} {'x eager':>7} {'x fold':>6} {'GF/s':>5} | {'train ms':>8} "
          f"{'keep':>7} {'eager':>7} {'x eager':>7} {'saved MB':>8} {'eager MB':>8} {'ratio':>5}")
    for ev, tr in zip(rows[0::2], rows[1::2]):
        print(f"{ev['block']:>24} {ev['batch']:>3} {ev['layout']:>13} "
              f"{ev['normops_ms']:8.2f} {ev['eager_ms']:7.2f} {ev['folded_ms']:7.2f} "
              f"{_fmt(ev.get('compile_ms'), '7.2f'):>7} {ev['x_eager']:7.2f} "
              f"{ev['x_folded']:6.2f} {ev['normops_gflops']:5.0f} | {tr['normops_ms']:8.2f} "
              f"{tr['normops_keep_ms']:7.2f} {tr['eager_ms']:7.2f} {tr['x_eager']:7.2f} "
              f"{tr['normops_saved_mb']:8.1f} {tr['eager_saved_mb']:8.1f} "
              f"{tr['saved_ratio']:5.2f}")
    evals = [r for r in rows if r["pass"] == "eval"]
    best = {}
    for r in evals:  # against the faster of eager NCHW / channels_last, per block and batch
        key = (r["block"], r["batch"])
        best[key] = min(best.get(key, np.inf), r["eager_ms"])
    ours_best = {}
    for r in evals:
        key = (r["block"], r["batch"])
        ours_best[key] = min(ours_best.get(key, np.inf), r["normops_ms"])
    gm = float(np.exp(np.mean([np.log(best[k] / ours_best[k]) for k in best])))
    print(f"\neval: geomean x (faster eager layout / faster normops layout) = {gm:.2f}; "
          f"geomean x folded = "
          f"{np.exp(np.mean([np.log(r['x_folded']) for r in evals])):.2f}; slowest x eager = "
          f"{min(r['x_eager'] for r in evals):.2f}")
    trains = [r for r in rows if r["pass"] == "train"]
    print(f"train: geomean x eager = {np.exp(np.mean([np.log(r['x_eager']) for r in trains])):.2f}"
          f" (keep: {np.exp(np.mean([np.log(r['x_eager_keep']) for r in trains])):.2f}); "
          f"largest saved ratio = {max(r['saved_ratio'] for r in trains):.3f}")
    for r in network:
        peak = "RSS" if r.get("device") == "cpu" else "allocated"
        extra = (f", peak {peak} {r['normops_peak_mb']:.0f} MB vs {r['eager_peak_mb']:.0f} MB "
                 f"({r['peak_ratio']:.2f})" if r["pass"] == "train" else "")
        print(f"mobilenet_v2 {r['pass']} batch {r['batch']}: normops {r['normops_ms']:.1f} ms, "
              f"eager {r['eager_ms']:.1f} ms, x{r['x_eager']:.2f}{extra}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.inverted_residual",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="all twelve blocks, more samples")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--compile", action="store_true", help="also torch.compile (slow to build)")
    p.add_argument("--no-network", action="store_true", help="skip the whole-network cases")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = json.loads((HERE / "shapes.json").read_text())["inverted_residual"]["mobilenet_v2"]
    blocks = [tuple(b) for b in shapes] if args.full else QUICK_BLOCKS
    sampling, timer = (FULL if args.full else QUICK), make_timer(args.device)
    rows = []
    for cfg in blocks:
        for batch in (1, 32):
            for layout in LAYOUTS:
                log(f"block {cfg} batch {batch} {layout}")
                rows += run_block(cfg, batch, layout, sampling, timer, args.compile, args.device)
    network = [] if args.no_network else run_network(sampling, timer, args.threads, args.device)
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{args.threads} threads, normops CPU kernels {normops.cpu_capability()}")
    print(f"float32, {where}")
    print_tables(rows, network)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "inverted_residual.json"
    path.write_text(json.dumps({"blocks": rows, "network": network}, indent=1))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
