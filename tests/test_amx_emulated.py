"""The AMX GEMM's tile core (csrc/cpu/amx_tiles.h) on machines without AMX: compiled with the
tile instructions emulated in software (tests/native/amx_emulated.cpp) and checked against a
plain dot product and for row invariance. On a machine with AMX the real kernel runs too:
the cpu backend's load-time check and tests/test_ops.py (backend cpu@amx) cover it."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the emulated kernel")
def test_amx_tile_core_emulated(tmp_path):
    exe = tmp_path / "amx_emulated"
    src = ROOT / "tests" / "native" / "amx_emulated.cpp"
    subprocess.run(["g++", "-std=c++20", "-O1", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)], check=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout
