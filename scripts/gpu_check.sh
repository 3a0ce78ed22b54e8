#!/usr/bin/env bash
# The GPU run, on a machine with a GPU and nvcc but no network (the device
# tool's machine: torch with CUDA, ninja, pytest preinstalled):
#   scripts/gpu_check.sh LOG_DIR
# builds normops for sm_90 (TORCH_CUDA_ARCH_LIST, default 9.0), runs the test
# suite on CUDA, compute-sanitizer (memcheck, racecheck) over a small CUDA
# test set, and the CUDA benchmarks; every step logs to LOG_DIR and the run
# goes on past a failing step. Sized to finish within about 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:?usage: scripts/gpu_check.sh LOG_DIR}
mkdir -p "$LOG"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
status=0
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$LOG/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG/summary.txt"
  tail -n 25 "$LOG/$name.log" | tee -a "$LOG/summary.txt"
  [ $rc -eq 0 ] || status=1
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  > "$LOG/device.txt" 2>&1
cat "$LOG/device.txt"
step build 300 python setup.py build_ext --inplace
step tests 240 python -m pytest -q -k "cuda and not cuda_build" tests -p no:cacheprovider
if command -v compute-sanitizer > /dev/null; then
  small=(tests/test_layer_norm.py -k "cuda and parity and float32")
  step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python -m pytest -q -p no:cacheprovider "${small[@]}"
  step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 1 \
    python -m pytest -q -p no:cacheprovider "${small[@]}"
fi
step bench 240 python -m benchmarks.run --device cuda --out "$LOG/bench"
exit $status
