#!/usr/bin/env bash
# One entry point for a fresh machine: creates the environment, installs torch
# and the build tools, builds normops in place, then runs what was asked.
#
#   scripts/dev.sh test  [pytest args]      the test suite
#   scripts/dev.sh bench [benchmark args]   the benchmark suite (see benchmarks/README.md)
#
# Needs Python >= 3.10, a C++ compiler and the package registries. A torch that
# the chosen Python already has is reused (the venv then sees the system site
# packages); otherwise torch==2.13.0 is installed. Settings: PYTHON (default
# python3), NORMOPS_VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-}
[ $# -gt 0 ] && shift
case "$what" in
  test|bench) ;;
  *) echo "usage: scripts/dev.sh test|bench [args...]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
VENV=${NORMOPS_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -c "import torch" >/dev/null 2>&1 || python -m pip install -q "torch==2.13.0"
python -m pip install -q numpy pytest ninja "setuptools>=64" wheel matplotlib

# Incremental (ninja) in-place build against the torch just found.
python setup.py -q build_ext --inplace

case "$what" in
  test) exec python -m pytest "$@" ;;
  bench) exec python -m benchmarks.run "$@" ;;
esac
