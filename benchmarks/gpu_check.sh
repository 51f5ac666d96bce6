#!/usr/bin/env bash
# GPU check, for a fresh CUDA machine holding only this repository and a CUDA build of torch:
#   1. build firp_engine._C with the CUDA kernels (pip install -e . --no-build-isolation,
#      falling back to setup.py build_ext --inplace), for this card's architecture only;
#   2. run tests/test_ops.py (parametrised over the available backends: torch, cpu, triton, cuda);
#   3. benchmark paged decode and tree attention (benchmarks/gpu_bench.py), markdown table.
#
#   bash benchmarks/gpu_check.sh
# Environment: PYTHON (default python3), SKIP_BUILD=1, SKIP_TESTS=1, BENCH_ARGS (extra arguments
# for gpu_bench.py), TEST_TIMEOUT / BENCH_TIMEOUT (seconds, default 600 each), OUT (a folder: the
# full log and the table are also written there). Build outputs stay in the tree, so a second
# run on the same machine can use SKIP_BUILD=1.
# Exit status: 0 when everything ran and passed, 1 otherwise (each step still runs).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG_DIR=${OUT:-/tmp}
mkdir -p "$LOG_DIR"
exec > >(tee "$LOG_DIR/gpu_check.log") 2>&1
status=0
section() { printf '\n## %s\n\n' "$1"; }
has_cuda_ops() {
  "$PY" -c "import sys, firp_engine._C as C; sys.exit(0 if hasattr(C, 'cuda_paged_decode_attention') else 1)" \
    2>/dev/null
}

section "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
if ! "$PY" -c "
import torch
print('torch', torch.__version__, '| cuda', torch.version.cuda, '| device available', torch.cuda.is_available())
assert torch.cuda.is_available()
print('device', torch.cuda.get_device_name(), '| capability', torch.cuda.get_device_capability())
"; then
  echo "A CUDA build of torch and a visible GPU are required."
  exit 1
fi
command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "(nvcc not on PATH; torch finds CUDA_HOME itself)"
"$PY" -c "import ninja" 2>/dev/null && echo "ninja: yes" || echo "ninja: no (setuptools builds serially, slower)"
CAP=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

section "build"
BENCH_JIT=""
if [[ -z "${SKIP_BUILD:-}" ]]; then
  start=$SECONDS
  "$PY" -m pip install -e . --no-build-isolation --no-deps 2>&1 | tail -25
  if ! has_cuda_ops; then
    echo "pip install did not give the CUDA ops; trying setup.py build_ext --inplace"
    "$PY" setup.py build_ext --inplace 2>&1 | tail -40
  fi
  echo "build took $((SECONDS - start)) s"
fi
if has_cuda_ops; then
  echo "firp_engine._C has the CUDA ops"
  "$PY" -c "import firp_engine._C as C; print(sorted(n for n in dir(C) if n.startswith('cuda_')))"
else
  echo "FAILED: firp_engine._C has no CUDA ops; the benchmark will JIT-build csrc/cuda instead"
  status=1
  BENCH_JIT="--jit"
fi
"$PY" -c "from firp_engine.backend import available_backends; print('available backends:', available_backends())"

section "tests"
if [[ -n "${SKIP_TESTS:-}" ]]; then
  echo "skipped (SKIP_TESTS)"
elif [[ -f tests/test_ops.py ]]; then
  timeout "${TEST_TIMEOUT:-600}" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_ops.py 2>&1 | tail -60
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
else
  echo "FAILED: tests/test_ops.py not found"
  status=1
fi

section "attention microbenchmarks"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
timeout "${BENCH_TIMEOUT:-600}" "$PY" benchmarks/gpu_bench.py $BENCH_JIT ${BENCH_ARGS:-} 2>&1 | tee "$LOG_DIR/gpu_bench.md"
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1

section "result"
[[ $status -eq 0 ]] && echo "gpu_check: all steps passed" || echo "gpu_check: some step FAILED (see above)"
exit $status
