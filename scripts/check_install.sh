#!/usr/bin/env bash
# Install check: `pip install .` and `pip install -e .` with build isolation, each into a fresh
# venv holding .venv's torch (bash scripts/setup.sh first), then firp_engine._C loaded and run
# from outside the source tree. Isolated, pip builds in an environment of its own: this checks
# that the build there used the torch the module then runs against (scripts/build_backend.py).
# Two full builds, several minutes: .ci/run runs it, the README's test command does not.
set -euo pipefail
cd "$(dirname "$0")/.."
# The portable module and one SIMD variant are enough to check the packaging (the test run
# builds them all): every variant is a full compile of the kernels.
export FIRP_CPU_PATHS=avx2
torch=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('torch'))")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The builds write into the source tree (build/, and firp_engine/_C*.so for the editable one):
# they get a copy of it, tracked and untracked files without what git ignores.
mkdir "$tmp/src"
git ls-files -z --cached --others --exclude-standard |
  tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$tmp/src"

# check NAME PIP_INSTALL_ARGS...: a fresh venv with that torch, the install, then one kernel call.
check() {
  local venv="$tmp/$1"
  shift
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$torch"
  "$venv/bin/pip" install -q "$@"
  (cd "$tmp" && "$venv/bin/python" - "pip install $*" <<'PY'
import sys

import torch

import firp_engine._C as C

x, w = torch.randn(4, 64), torch.randn(64)
ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
torch.testing.assert_close(C.rms_norm(x, w, 1e-6), ref)
from firp_engine.backends import cpu

print(f"install check ({sys.argv[1]}): {C.__file__} runs with torch {torch.__version__}; cpu path {cpu.ISA}")
PY
  )
}

check wheel "$tmp/src"
check editable -e "$tmp/src"
