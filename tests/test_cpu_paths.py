"""The cpu backend's SIMD path, chosen at load (firp_engine/backends/cpu.py): what the CPU
and OS run (cpuid + XCR0, csrc/cpu/cpuid.cpp) against /proc/cpuinfo, the best built variant
by default, FIRP_CPU_ISA forcing a lower one, and every runnable variant as a backend
`cpu@<path>` running its own module's kernels (tests/test_ops.py tests each against the
torch reference)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from firp_engine.backend import Backend, available_backends
from firp_engine.errors import FirpError

cpu = pytest.importorskip("firp_engine.backends.cpu", reason="the cpu backend's extension is not built")

# /proc/cpuinfo flags a path needs (Linux lists only what the OS enables, like XCR0 does).
FLAGS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512bf16": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"},
}


def cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    return set(line.split(":", 1)[1].split()) if line else None


def test_detected_paths_match_cpuinfo():
    flags = cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert cpu.CPU_PATHS[-1] == "scalar"
    for path, needed in FLAGS.items():
        assert (path in cpu.CPU_PATHS) == (needed <= flags), path
    if "amx" in cpu.CPU_PATHS:
        assert {"amx_tile", "amx_bf16"} <= flags


def test_best_runnable_variant_is_the_default():
    built = list(cpu.MODULES)
    assert built and built[-1] == "scalar" and set(built) <= set(cpu.CPU_PATHS)
    if os.environ.get("FIRP_CPU_ISA"):
        pytest.skip("FIRP_CPU_ISA is set for this run")
    assert cpu.ISA == built[0] and Backend.create("cpu").isa == built[0]


def test_every_variant_is_a_backend_with_its_own_kernels():
    names = [n for n in available_backends() if n.startswith("cpu@")]
    assert names == [f"cpu@{p}" for p in cpu.MODULES]
    for name in names:
        b = Backend.create(name)
        module = cpu.MODULES[b.isa]
        assert b.isa == name.split("@")[1] == module.cpu_isa
        assert b.op("linear") is module.linear and b.fallbacks == ()
        x, w = torch.randn(3, 64), torch.randn(64)
        ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        torch.testing.assert_close(b.op("rms_norm")(x, w, 1e-6), ref)


@pytest.mark.parametrize("name", ["cpu@avx9", "torch@avx2", "cpu@"])
def test_unknown_variant_is_one_line(name):
    with pytest.raises(FirpError, match="backend"):
        Backend.create(name)


def forced(value: str) -> dict:
    """cpu.ISA and the warnings of a fresh interpreter run with FIRP_CPU_ISA=value."""
    code = (
        "import json, warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import torch\n"
        "    from firp_engine.backends import cpu\n"
        "print(json.dumps({'isa': cpu.ISA, 'warnings': [str(x.message) for x in w]}))\n"
    )
    env = {**os.environ, "FIRP_CPU_ISA": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_forcing_a_lower_path():
    got = forced("scalar")
    assert got == {"isa": "scalar", "warnings": []}
    lower = list(cpu.MODULES)[1:-1]
    if lower:  # e.g. avx512 on an avx512bf16 machine
        assert forced(lower[0])["isa"] == lower[0]


def test_forcing_a_path_this_machine_lacks_warns_and_runs_the_best():
    best = list(cpu.MODULES)[0]
    missing = [p for p in cpu.PATHS if p not in cpu.MODULES]
    if not missing:
        pytest.skip("this machine runs every path")
    got = forced(missing[0])
    assert got["isa"] == best
    assert any(f"FIRP_CPU_ISA={missing[0]}" in w and best in w for w in got["warnings"])
    bogus = forced("sse9")
    assert bogus["isa"] == best and any("no such path" in w for w in bogus["warnings"])


def test_a_path_is_checked_in_a_child_process_and_the_verdict_cached(tmp_path, monkeypatch):
    """The check that guards the AMX kernel (never run here): a path agreeing with its reference
    passes, one whose child process crashes is refused with a warning; verdicts are cached."""
    monkeypatch.setattr(cpu, "CACHE", tmp_path)
    if "avx2" not in cpu.MODULES:
        pytest.skip("no second path to compare the portable one with")
    assert cpu._agrees("avx2", "scalar") is True
    assert len(list(tmp_path.glob("verified_avx2_*.json"))) == 1
    monkeypatch.setattr(cpu, "_AGREE", "import os; os.abort()")
    assert cpu._agrees("avx2", "scalar") is True  # the cached verdict: no child runs
    for f in tmp_path.glob("*.json"):
        f.unlink()
    with pytest.warns(Warning, match="avx2 GEMM failed"):
        assert cpu._agrees("avx2", "scalar") is False
