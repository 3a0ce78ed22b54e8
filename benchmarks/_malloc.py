"""glibc malloc settings for steady timings (see run.py's docstring); torch-free,
so a benchmark can re-execute itself with them before importing torch."""
import os
import sys

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "68719476736",
              "MALLOC_MMAP_MAX_": "0"}


def reexec_with_malloc_env() -> None:
    """Re-executes this process (same argv) with MALLOC_ENV set where unset;
    NORMOPS_BENCH_NO_REEXEC=1 skips it."""
    missing = {k: v for k, v in MALLOC_ENV.items() if k not in os.environ}
    if missing and not os.environ.get("NORMOPS_BENCH_NO_REEXEC"):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **missing})
