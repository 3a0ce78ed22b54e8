#!/usr/bin/env bash
# The GPU run, on a machine with a GPU and nvcc but no network (the device
# tool's machine: torch with CUDA, ninja, pytest preinstalled):
#   scripts/gpu_check.sh LOG_DIR [STEP...]
# builds normops for sm_90 (TORCH_CUDA_ARCH_LIST, default 9.0), runs the test
# suite on CUDA, the CUDA benchmarks (float32, the inverted residual, and
# bfloat16 layer norm), the
# kernels and device time of a training step (benchmarks/cuda_launches.py),
# and compute-sanitizer (memcheck, racecheck) over a small CUDA test set;
# STEPs pick a subset (default: all, in the order below). Every step logs to
# LOG_DIR (one file per step and summary.txt) and the run goes
# on past a failing step. BUDGET_S (default 480) bounds the whole run: a step
# gets at most what is left of it, and one that cannot get 20 s is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:?usage: scripts/gpu_check.sh LOG_DIR [STEP...]}
shift
STEPS=" ${*:-build tests launches bench bench_ir bench_bf16 memcheck racecheck} "
mkdir -p "$LOG"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}   # the device image has python3, not python
BUDGET_S=${BUDGET_S:-480}
status=0
step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  [[ $STEPS == *" $name "* ]] || return 0
  local left=$((BUDGET_S - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then
    echo "== $name: skipped, $left s of the budget left" | tee -a "$LOG/summary.txt"
    return 0
  fi
  echo "== $name ($limit s): $*" | tee -a "$LOG/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG/summary.txt"
  tail -n 25 "$LOG/$name.log" | tee -a "$LOG/summary.txt"
  [ $rc -eq 0 ] || status=1
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  2>&1 | tee -a "$LOG/summary.txt"
xdist=()
$PY -c "import xdist" 2> /dev/null && xdist=(-n 8)
step build 240 $PY setup.py build_ext --inplace
step tests 200 $PY -m pytest -q -p no:cacheprovider "${xdist[@]}" -k "cuda and not cuda_build" tests
step launches 60 $PY -m benchmarks.cuda_launches
# The tables are in the logs; the csv/json/png go beside (the device tool
# returns at most 8 files).
step bench 150 $PY -m benchmarks.run --device cuda --out "${BENCH_OUT:-/tmp/normops-bench}"
# The inverted residual's CUDA training (batch-norm kernels, torch's convolutions,
# the recomputing backward) and the whole network's peak memory.
step bench_ir 90 $PY -m benchmarks.inverted_residual --device cuda --out "${BENCH_OUT:-/tmp/normops-bench}"
step bench_bf16 90 $PY -m benchmarks.run --device cuda --dtype bfloat16 --ops ln,bn \
  --out "${BENCH_OUT:-/tmp/normops-bench}"
if command -v compute-sanitizer > /dev/null; then
  small=(tests/test_layer_norm.py tests/test_batch_norm.py tests/test_group_norm.py
         tests/test_instance_norm.py -k "cuda and dtype1 and (train_eval or layer_norm_parity or group_norm_parity and True or instance_norm_modules and kw0)")
  step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 \
    $PY -m pytest -q -p no:cacheprovider -x "${small[@]}"
  # racecheck is several times slower than memcheck: a fifth of the set.
  smaller=(tests/test_layer_norm.py tests/test_batch_norm.py tests/test_group_norm.py
           tests/test_instance_norm.py -k "cuda and dtype1 and (train_eval and shape1 or layer_norm_parity and both or group_norm_parity and True and channels_last or instance_norm_modules and kw0 and shape2)")
  step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 1 \
    $PY -m pytest -q -p no:cacheprovider -x "${smaller[@]}"
fi
exit $status
