#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and no network (torch + CUDA, pytest, ninja already installed): build
# clfast in place, run the CUDA tests and the GPU benchmarks, and write one log to commit under
# benchmarks/results/. Packages the machine lacks are taken from wheels in .whl/ (carried with the tree):
# pytest-benchmark and py-cpuinfo for the benchmarks, nngeometry for the EWC/OCAR ones, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       pytest-benchmark py-cpuinfo nngeometry==0.4
# Usage: benchmarks/gpu_check.sh [LOG]   (default benchmarks/results/gpu_check-<date>.log)
#
# Without a GPU every CUDA kernel already runs in CI on the emulated device (tests/cuemu, README: "How the CUDA
# code is verified"). What only this run can tell: performance and occupancy (the benchmarks), weak memory
# ordering, true concurrency between blocks and streams, warp-synchronous code without a _sync operation, and
# FMA-contracted numerics (the CUDA tests against the references), plus compute-sanitizer's racecheck and
# memcheck on real hardware when it is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${1:-benchmarks/results/gpu_check-$(date -u +%Y%m%d-%H%M).log}
mkdir -p "$(dirname "$LOG")"
status=0
step() {  # step NAME CMD...: runs, logs, and remembers the first failure
  echo; echo "## $1"; shift
  "$@" || { rc=$?; echo "!! failed with exit code $rc"; [ $status -ne 0 ] || status=$rc; }
}
{
  echo "# clfast GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "|", torch.cuda.get_device_name())'
  if ! $PY -c 'import pytest_benchmark' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/clfast-site .whl/*.whl
    export PYTHONPATH=/tmp/clfast-site
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  step "build (FORCE_CUDA=1)" env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    MAX_JOBS="${MAX_JOBS:-8}" $PY setup.py -q build_ext --inplace
  step "CUDA tests" $PY -m pytest tests -m cuda -q -p no:cacheprovider -rs
  if command -v compute-sanitizer >/dev/null; then
    for tool in racecheck memcheck; do
      step "compute-sanitizer $tool (op matrix)" compute-sanitizer --tool "$tool" --error-exitcode 1 \
        $PY -m pytest tests/test_ops.py -m cuda -q -p no:cacheprovider
    done
  else
    echo "(compute-sanitizer not installed: racecheck / memcheck not run)"
  fi
  if $PY -c 'import pytest_benchmark' 2>/dev/null; then
    step "GPU benchmarks" $PY -m pytest benchmarks -k cuda -q -p no:cacheprovider \
      --benchmark-columns=min,median,mean,rounds --benchmark-sort=name
  else
    echo "!! pytest-benchmark missing: GPU benchmarks not run (bring its wheels in .whl/)"; status=1
  fi
  echo; echo "# exit status $status"
  exit "$status"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
