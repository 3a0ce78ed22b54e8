"""Benchmark normops against ATen eager and torch.compile.

    python -m benchmarks.run [--full] [--threads 1,2] [--ops bn,bn_relu6,ln,in,gn]
                             [--out DIR] [--device cpu|cuda] [--dtype float32|bfloat16|float16]

Run from the repository root. For every case (op family, shape, layout) and
thread count it times, in one process and interleaved so that drift hits all
of them alike: normops, ATen eager (torch.nn.functional), torch.compile of the
ATen version, and a plain `dst.copy_(src)` of as many bytes as the op's minimal
memory traffic; each for the forward of a training step and for a whole
forward+backward step. See benchmarks/README.md for the columns.

glibc reads its MALLOC_*_ variables only at process start, so when any of
MALLOC_ENV is unset this script re-executes itself (os.execve, same argv) with
it set (values already in the environment are kept; NORMOPS_BENCH_NO_REEXEC=1
skips the re-exec). MALLOC_MMAP_THRESHOLD_=32 MiB and MALLOC_TRIM_THRESHOLD_=
64 GiB keep freed memory in the heap; MALLOC_MMAP_MAX_=0 sends the allocations
above 32 MiB there too. Without it, a large output is a fresh mmap that page-
faults on every call, or is served from a free heap chunk left by an earlier
case, depending on the heap's history: one implementation then paid ~25k page
faults per call and the other none. With it, no participant page-faults in the
steady state, like the copy it is compared with.
"""
import sys

if __name__ == "__main__":  # before torch is imported: glibc reads these at startup
    from benchmarks._malloc import reexec_with_malloc_env
    reexec_with_malloc_env()

import argparse  # noqa: E402
import csv  # noqa: E402
import ctypes  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, Iterator, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import normops  # noqa: E402
import normops.functional as NF  # noqa: E402
from benchmarks._malloc import MALLOC_ENV  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MB, GB = 1 << 20, 1 << 30
TARGET_WORKING_SET = 640 * MB   # rotate inputs until this much is touched: well past the L3
MEMORY_CAP = 4 * GB             # at most this in the rotation pools of one case (3 of them)
IMPLS = ("normops", "aten", "compile", "copy")
FAMILIES = ("bn", "bn_relu6", "ln", "in", "gn")
EPS, MOMENTUM = 1e-5, 0.1

# The quick default: a representative subset of shapes.json per family.
QUICK_SHAPES = {
    "bn": [[32, 256, 56, 56], [32, 576, 14, 14], [32, 2048, 7, 7]],
    "bn_relu6": [[32, 144, 56, 56], [32, 960, 7, 7]],
    "ln": [[4096, 768], [4096, 4096]],
    "in": [[1, 64, 128, 128], [2, 64, 32, 64, 64]],
    "gn": [[2, 256, 50, 76], [32, 512, 28, 28]],
}


@dataclass(frozen=True)
class Sampling:
    warmup: int
    min_samples: int
    max_samples: int
    target_s: float   # aim for this much timed work per pass (all participants)


QUICK = Sampling(warmup=2, min_samples=7, max_samples=60, target_s=0.8)
FULL = Sampling(warmup=4, min_samples=21, max_samples=200, target_s=3.0)


def log(msg: str, end: str = "\n") -> None:
    print(msg, end=end, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Op families: each builds, for one shape, the parameters to differentiate and
# make(impl) -> fn(x), with its own running statistics per implementation.

def _affine(C: int, device: str, dtype=torch.float32):
    w = (torch.rand(C, device=device) + 0.5).to(dtype).requires_grad_()
    b = (torch.randn(C, device=device) * 0.1).to(dtype).requires_grad_()
    return w, b


def _batch_norm(shape, device, dtype, activation=None):
    C = shape[1]
    w, b = _affine(C, device)  # float32 beside half inputs: batch norm under AMP

    def make(impl):
        rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
        if impl == "normops":
            return lambda x: NF.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS,
                                           activation=activation)
        act = F.relu6 if activation == "relu6" else (lambda y: y)
        return lambda x: act(F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS))
    return (w, b), make


def _layer_norm(shape, device, dtype):
    w, b = _affine(shape[-1], device, dtype)

    def make(impl):
        f = NF.layer_norm if impl == "normops" else F.layer_norm
        return lambda x: f(x, shape[-1:], w, b, EPS)
    return (w, b), make


def _instance_norm(shape, device, dtype):
    w, b = _affine(shape[1], device, dtype)

    def make(impl):
        f = NF.instance_norm if impl == "normops" else F.instance_norm
        return lambda x: f(x, None, None, w, b, True, MOMENTUM, EPS)
    return (w, b), make


def _group_norm(shape, device, dtype, groups):
    w, b = _affine(shape[1], device, dtype)

    def make(impl):
        f = NF.group_norm if impl == "normops" else F.group_norm
        return lambda x: f(x, groups, w, b, EPS)
    return (w, b), make


BUILDERS = {
    "bn": _batch_norm,
    "bn_relu6": lambda shape, device, dtype: _batch_norm(shape, device, dtype, activation="relu6"),
    "ln": _layer_norm,
    "in": _instance_norm,
    "gn": _group_norm,
}


@dataclass(frozen=True)
class Case:
    family: str
    label: str            # the model / group in shapes.json
    shape: tuple
    channels_last: bool
    kwargs: tuple = ()    # extra builder arguments, e.g. (("groups", 32),)

    @property
    def layout(self) -> str:
        if len(self.shape) == 2:
            return "rows"
        return {(4, False): "NCHW", (4, True): "NHWC",
                (5, False): "NCDHW", (5, True): "NDHWC"}[(len(self.shape), self.channels_last)]

    @property
    def shape_str(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def name(self) -> str:
        return f"{self.family} {self.shape_str} {self.layout}"


def load_cases(shapes_path: Path, families: Sequence[str], full: bool) -> List[Case]:
    data = json.loads(shapes_path.read_text())
    groups = {
        "bn": [(k, s, ()) for k, v in data["batch_norm_2d"].items() for s in v],
        # ReLU6 is MobileNetV2's activation: fused BN+ReLU6 on its shapes.
        "bn_relu6": [("mobilenet_v2_b32_224", s, ())
                     for s in data["batch_norm_2d"]["mobilenet_v2_b32_224"]],
        "ln": [(k, s, ()) for k, s in data["layer_norm"].items() if not k.startswith("_")],
        "in": [(k, s, ()) for key in ("instance_norm_2d", "instance_norm_3d")
               for k, v in data[key].items() for s in v],
        "gn": [(k, s, (("groups", v["groups"]),))
               for k, v in data["group_norm"].items() for s in v["shapes"]],
    }
    cases, seen = [], set()
    for fam in families:
        for label, shape, kw in groups[fam]:
            if (fam, tuple(shape)) in seen or (not full and shape not in QUICK_SHAPES[fam]):
                continue
            seen.add((fam, tuple(shape)))
            for cl in ((False,) if len(shape) == 2 else (False, True)):
                cases.append(Case(fam, label, tuple(shape), cl, kw))
    return cases


# --------------------------------------------------------------------------
# Timing harness, shared by every op family.

def make_timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def cuda_timer(fn):
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return cuda_timer

    def cpu_timer(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return cpu_timer


def measure(steps: Dict[str, Callable[[int], object]], timer, sampling: Sampling
            ) -> Dict[str, np.ndarray]:
    """Per-call times (s) of each step(i), i indexing the input rotation.
    Participants are interleaved (A B C, then C B A, ...) so that drift and
    noise hit all of them alike. A step whose first call raises is dropped
    (its times are NaN)."""
    live = {}
    for name, step in steps.items():
        try:
            step(0)
            live[name] = step
        except Exception as exc:  # noqa: BLE001 - a failing participant must not end the run
            log(f"    {name} failed: {type(exc).__name__}: {str(exc)[:200]}")
    round_s = 0.0
    for w in range(1, sampling.warmup + 1):
        round_s = sum(timer(lambda: s(w)) for s in live.values())
    n = int(np.clip(sampling.target_s / max(round_s, 1e-9),
                    sampling.min_samples, sampling.max_samples))
    names, times = list(live), {name: [] for name in live}
    gc.collect()
    gc.disable()
    try:
        for i in range(n):
            for name in (names if i % 2 == 0 else names[::-1]):
                times[name].append(timer(lambda: live[name](sampling.warmup + 1 + i)))
    finally:
        gc.enable()
    return {name: np.asarray(times.get(name) or [np.nan]) for name in steps}


def rotation_count(slot_bytes: int, cap: int) -> int:
    """Copies to rotate through: enough that one pass over them touches
    TARGET_WORKING_SET bytes (at least 2), within the memory cap (at least 1)."""
    want = max(2, math.ceil(TARGET_WORKING_SET / slot_bytes))
    return max(1, min(want, cap // slot_bytes))


def memory_cap(device: str) -> int:
    if device == "cuda":
        return min(MEMORY_CAP, torch.cuda.mem_get_info()[0] // 4)
    try:
        meminfo = Path("/proc/meminfo").read_text()
        avail = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    except (OSError, AttributeError):
        return MEMORY_CAP
    return min(MEMORY_CAP, avail // 4)


def rotation(step: Callable[[int], object], n: int, offset: int) -> Callable[[int], object]:
    """step over slot (i + offset) % n: participants start at different
    slots, so none finds the inputs another one just read still in cache."""
    return lambda i: step((i + offset) % n)


def background_cpu_busy(seconds: float = 0.5) -> Optional[float]:
    """Fraction of the machine's CPU time used by others while we sleep."""
    def snapshot():
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
        return sum(ticks), ticks[3] + ticks[4]   # total, idle + iowait
    try:
        (t0, i0), _, (t1, i1) = snapshot(), time.sleep(seconds), snapshot()
    except (OSError, ValueError, IndexError):
        return None
    return round(1 - (i1 - i0) / max(t1 - t0, 1), 3)


def release_freed_memory() -> None:
    """Between cases (never while timing): hand the heap's free pages back,
    which MALLOC_TRIM_THRESHOLD_ otherwise never does, so that the footprint
    follows the current case rather than growing with heap fragmentation."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def stats_ms(t: np.ndarray) -> Dict[str, float]:
    if np.isnan(t).all():
        return {"median": math.nan, "p20": math.nan, "p80": math.nan}
    p20, med, p80 = np.percentile(t, [20, 50, 80]) * 1e3
    return {"median": float(med), "p20": float(p20), "p80": float(p80)}


def run_case(case: Case, thread_counts: Sequence[int], device: str, sampling: Sampling,
             timer, cap: int, dtype: torch.dtype = torch.float32) -> Iterator[List[dict]]:
    """Time one case at each thread count; yields that thread count's rows
    (fwd, fwd+bwd). Inputs and copy buffers are built once per case."""
    torch.manual_seed(0)
    params, make = BUILDERS[case.family](case.shape, device, dtype, **dict(case.kwargs))
    eager = {impl: make(impl) for impl in ("normops", "aten")}
    fmt = {"memory_format": (torch.channels_last if len(case.shape) == 4
                             else torch.channels_last_3d)} if case.channels_last else {}
    x0, dy0 = (torch.randn(case.shape, device=device).to(dtype=dtype, **fmt) for _ in range(2))
    x_bytes = x0.numel() * x0.element_size()
    n = rotation_count(2 * x_bytes, cap // 3)   # a slot holds x and dy
    xs = [x0.clone().requires_grad_() for _ in range(n)]
    dys = [dy0.clone() for _ in range(n)]
    del x0, dy0

    def fwd(fn):
        return lambda k: fn(xs[k])

    def fwd_bwd(fn):
        return lambda k: torch.autograd.grad(fn(xs[k]), (xs[k], *params), dys[k])

    passes = []
    for pass_name, wrap, traffic in (("fwd", fwd, 2 * x_bytes), ("fwd+bwd", fwd_bwd, 5 * x_bytes)):
        bufs = [(torch.ones(traffic // 4, device=device), torch.ones(traffic // 4, device=device))
                for _ in range(rotation_count(2 * traffic, cap // 3))]
        passes.append((pass_name, wrap, traffic, bufs))

    for threads in thread_counts:
        torch.set_num_threads(threads)
        # torch.compile once per case and thread count (inductor bakes the
        # thread count into its CPU kernels); the first call compiles the
        # forward and the backward.
        torch._dynamo.reset()
        fns, compile_s = dict(eager), math.nan
        try:
            compiled = torch.compile(make("aten"))
            t0 = time.perf_counter()
            fwd_bwd(compiled)(0)
            compile_s = time.perf_counter() - t0
            fns["compile"] = compiled
        except Exception as exc:  # noqa: BLE001 - record NaN and go on
            log(f"    torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}")

        rows = []
        for pass_name, wrap, traffic, bufs in passes:
            steps = {impl: rotation(wrap(fn), n, j * n // len(fns))
                     for j, (impl, fn) in enumerate(fns.items())}
            steps["copy"] = rotation(lambda k, bufs=bufs: bufs[k][1].copy_(bufs[k][0]), len(bufs), 0)
            t = {impl: stats_ms(v) for impl, v in measure(steps, timer, sampling).items()}
            t.setdefault("compile", stats_ms(np.asarray([np.nan])))
            nm, at, co, cp = (t[i]["median"] for i in IMPLS)
            gbps, copy_gbps = traffic / nm / 1e6, 2 * traffic / cp / 1e6
            rows.append({
                "family": case.family, "label": case.label, "shape": case.shape_str,
                "layout": case.layout, "threads": threads, "pass": pass_name,
                **{f"{impl}_{k}": v for impl in IMPLS for k, v in t[impl].items()},
                "speedup_aten": at / nm, "speedup_compile": co / nm,
                "normops_gbps": gbps, "copy_gbps": copy_gbps, "copy_fraction": gbps / copy_gbps,
                "traffic_bytes": traffic, "input_copies": n, "copy_copies": len(bufs),
                "compile_s": compile_s,
            })
        yield rows


# --------------------------------------------------------------------------
# Reporting.

def _f(v: float, spec: str) -> str:
    return "-" if v is None or math.isnan(v) else format(v, spec)


TABLE = [  # header, width, row -> text
    ("op", 9, lambda r: r["family"]),
    ("shape", 17, lambda r: r["shape"]),
    ("layout", 6, lambda r: r["layout"]),
    ("thr", 3, lambda r: str(r["threads"])),
    ("pass", 7, lambda r: r["pass"]),
    ("normops ms", 10, lambda r: _f(r["normops_median"], ".3f")),
    ("aten ms", 9, lambda r: _f(r["aten_median"], ".3f")),
    ("compile ms", 10, lambda r: _f(r["compile_median"], ".3f")),
    ("x aten", 6, lambda r: _f(r["speedup_aten"], ".2f")),
    ("x compile", 9, lambda r: _f(r["speedup_compile"], ".2f")),
    ("GB/s", 6, lambda r: _f(r["normops_gbps"], ".1f")),
    ("% copy", 6, lambda r: _f(100 * r["copy_fraction"], ".0f")),
]


def print_table(rows: List[dict]) -> None:
    print("  ".join(f"{h:>{w}}" for h, w, _ in TABLE))
    for r in rows:
        print("  ".join(f"{get(r):>{w}}" for _, w, get in TABLE))


def _geomean_min(rows: List[dict], key: str) -> str:
    vals = [(r[key], r) for r in rows if not math.isnan(r[key])]
    if not vals:
        return "-"
    gm = math.exp(sum(math.log(v) for v, _ in vals) / len(vals))
    lo, r = min(vals, key=lambda p: p[0])
    return f"{gm:5.2f} (min {lo:.2f} {r['shape']} {r['layout']})"


def summarize(rows: List[dict]) -> List[str]:
    lines = ["normops speedup, geometric mean over cases (and the minimum):",
             f"{'op':9} {'thr':>3} {'cases':>5}  {'fwd x aten':>10}  "
             f"{'fwd+bwd x aten':<40}  fwd+bwd x compile"]
    keys = sorted({(r["family"], r["threads"]) for r in rows},
                  key=lambda k: (FAMILIES.index(k[0]), k[1]))
    for fam, thr in keys:
        sel = [r for r in rows if r["family"] == fam and r["threads"] == thr]
        fb = [r for r in sel if r["pass"] == "fwd+bwd"]
        fwd = _geomean_min([r for r in sel if r["pass"] == "fwd"], "speedup_aten").split(" (")[0]
        lines.append(f"{fam:9} {thr:>3} {len(fb):>5}  {fwd:>10}  "
                     f"{_geomean_min(fb, 'speedup_aten'):<40}  {_geomean_min(fb, 'speedup_compile')}")
    return lines


def metadata(args, threads: List[int]) -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        cpu = platform.processor()
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": sys.orig_argv, "mode": "full" if args.full else "quick", "device": args.device,
        "dtype": args.dtype,
        "platform": platform.platform(), "cpu_model": cpu, "logical_cpus": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "python": platform.python_version(), "torch": torch.__version__,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "normops": normops.__version__, "normops_cpu_capability": normops.cpu_capability(),
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None,
        "background_cpu_busy_start": background_cpu_busy(),
        "threads": threads, "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "target_working_set_bytes": TARGET_WORKING_SET, "memory_cap_bytes": MEMORY_CAP,
        "sampling": vars(FULL if args.full else QUICK),
    }


def plot(rows: List[dict], path: Path, meta: dict) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["family"], r["shape"], r["layout"], r["threads"]) for r in rows))
    speed = {(r["family"], r["shape"], r["layout"], r["threads"], r["pass"]): r["speedup_aten"]
             for r in rows}
    y = np.arange(len(cases))
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.28 * len(cases)))
    for k, (pass_name, color) in enumerate((("fwd", "tab:blue"), ("fwd+bwd", "tab:orange"))):
        vals = np.array([speed.get((*c, pass_name), math.nan) for c in cases])
        ax.barh(y + (k - 0.5) * 0.4, vals - 1, left=1, height=0.4, color=color, label=pass_name)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    finite = [v for v in speed.values() if v > 0 and math.isfinite(v)] or [1.0]
    ax.set_xlim(2.0 ** math.floor(math.log2(min(finite + [1.0]))),
                2.0 ** math.ceil(math.log2(max(finite + [1.0]))))
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks(y, [f"{f} {s} {l} t{t}" for f, s, l, t in cases], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of normops vs ATen eager (ATen time / normops time), log scale")
    ax.set_title(f"normops vs ATen: {meta['cpu_model']}, torch {meta['torch']}, "
                 f"{meta['device']}, {meta['dtype']} inputs", fontsize=9)
    ax.legend(loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: List[dict], meta: dict, summary: List[str], out: Path) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{meta['device']}-{meta['dtype']}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    paths = [stem.with_suffix(s) for s in (".csv", ".json", ".png")]
    with paths[0].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    paths[1].write_text(json.dumps({"metadata": meta, "summary": summary, "results": rows},
                                   indent=1, default=str))
    plot(rows, paths[2], meta)
    return paths


# --------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every shape in shapes.json, more samples")
    p.add_argument("--threads", help="comma-separated CPU thread counts (default: 1 and all; "
                   "on cuda: all)")
    p.add_argument("--ops", default=",".join(FAMILIES), help=f"subset of {','.join(FAMILIES)}")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="input dtype (batch norm keeps float32 parameters, as under AMP; the "
                   "others take the input's)")
    p.add_argument("--shapes", type=Path, default=HERE / "shapes.json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if bad := [o for o in args.ops if o not in FAMILIES]:
        p.error(f"unknown --ops {bad}; choose from {','.join(FAMILIES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: CUDA is not available to this torch ({torch.__version__}, "
                f"CUDA {torch.version.cuda}); run with --device cpu")
    try:
        args.threads = ([int(t) for t in args.threads.split(",")] if args.threads
                        else [torch.get_num_threads()] if args.device == "cuda"
                        else sorted({1, torch.get_num_threads()}))
    except ValueError:
        p.error(f"--threads expects comma-separated integers, got {args.threads!r}")
    if any(t < 1 for t in args.threads):
        p.error("--threads must be positive")
    try:  # now, not after minutes of measuring
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"--out {args.out}: cannot create the output folder ({exc.strerror})")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    sampling = FULL if args.full else QUICK
    cases = load_cases(args.shapes, args.ops, args.full)
    timer, cap = make_timer(args.device), memory_cap(args.device)
    meta = metadata(args, args.threads)
    log(f"normops benchmark ({meta['mode']}, {args.dtype}): {len(cases)} cases x threads "
        f"{args.threads} on "
        f"{args.device} ({meta['cpu_model']}, normops {meta['normops_cpu_capability']}); "
        f"malloc env {'set' if all(meta['malloc_env'].values()) else 'NOT set'}")
    if (busy := meta["background_cpu_busy_start"] or 0) > 0.1:
        log(f"warning: other processes keep {busy:.0%} of the CPUs busy; timings (above all "
            f"with {max(args.threads)} threads) will be noisy")
    rows, total, t_start, k = [], len(cases) * len(args.threads), time.perf_counter(), 0
    for case in cases:
        t0 = time.perf_counter()
        for new in run_case(case, args.threads, args.device, sampling, timer, cap,
                            getattr(torch, args.dtype)):
            k += 1
            log(f"[{k:>3}/{total}] {case.name} t={new[0]['threads']}:"
                + "".join(f"  {r['pass']} x{_f(r['speedup_aten'], '.2f')}" for r in new)
                + f"  (compile {_f(new[0]['compile_s'], '.1f')}s, {time.perf_counter() - t0:.1f}s)")
            rows += new
            t0 = time.perf_counter()
        release_freed_memory()
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    meta["background_cpu_busy_end"] = background_cpu_busy()
    meta["max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print_table(rows)
    summary = summarize(rows)
    print("\n" + "\n".join(summary))
    for path in write_outputs(rows, meta, summary, args.out):
        log(f"wrote {path}")
    log(f"done in {meta['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
