"""CPU backend: the C++ kernels of `csrc/cpu`, built once per SIMD path.

The build holds `firp_engine._C` (portable C++, plus CPU detection) and `_C_avx2`,
`_C_avx512`, `_C_avx512bf16` (those the compiler could build). At import, `_C.cpu_paths()`
reads what this CPU and its OS run (cpuid, XCR0), and the best built variant among those is
the `cpu` backend; `FIRP_CPU_ISA=avx2|avx512|avx512bf16|scalar` forces a lower one. Every
runnable variant is also a backend of its own, `cpu@<path>`, so that tests and benchmarks
compare paths in one process.

Unavailable (ImportError) until the modules are built: `pip install -e . --no-build-isolation`
or `python setup.py build_ext --inplace`. The pybind11 functions take the reference's exact
arguments (keywords included), so they are registered as they are: no Python wrapper sits
between the decode loop and the kernels. They raise on an input they do not support (e.g. a
head dim the attention kernels are not built for), which `Backend.for_model` reads at start-up.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from firp_engine import _C  # ImportError here = backend unavailable
from firp_engine.errors import FirpError, FirpWarning
from firp_engine.ops import REFERENCES, register
from firp_engine.quant import QuantWeight

# Every op has a kernel here; pack_linear is wrapped below (it also packs GGUF blocks).
OPS = tuple(op for op in REFERENCES if op != "pack_linear")
# Best first. "amx" is the avx512bf16 kernels with the bf16 GEMM on AMX tiles.
PATHS = ("amx", "avx512bf16", "avx512", "avx2", "scalar")


def _runnable() -> dict[str, ModuleType]:
    """path -> module, for the paths this CPU runs and this build holds, best first."""
    have = set(_C.cpu_paths())
    out = {}
    for path in PATHS:
        if path not in have:
            continue
        try:
            out[path] = importlib.import_module(_module_name(path))
        except ImportError:
            continue  # not built: the compiler lacked the flags, or FIRP_CPU_PATHS left it out
    if "amx" in out and ("avx512bf16" not in out or not _agrees("amx", "avx512bf16")):
        del out["amx"]
    return out


# Runs in a child process: a kernel that has never run on this kind of machine may crash the
# process (an illegal tile configuration), not only disagree. Prints the worst relative error.
_AGREE = r"""
import importlib, sys, torch
new, ref = (importlib.import_module(name) for name in sys.argv[1:3])
g = torch.Generator().manual_seed(0)
w = torch.randn(40, 96, generator=g).to(torch.bfloat16)
worst = 0.0
for m in (1, 5, 16, 17, 64, 70):
    x = torch.randn(m, 96, generator=g).to(torch.bfloat16)
    got = new.linear(x, w, new.pack_linear(w)).float()
    want = ref.linear(x, w, ref.pack_linear(w)).float()
    worst = max(worst, ((got - want).abs() / (1 + want.abs())).max().item())
print(worst)
"""
# as firp/budget.py's cache of step cost curves
CACHE = Path(os.environ.get("FIRP_CACHE", Path.home() / ".cache" / "firp-engine"))


def _module_name(path: str) -> str:
    return "firp_engine._C" if path == "scalar" else f"firp_engine._C_{path}"


def _agrees(path: str, ref: str) -> bool:
    """`path`'s bf16 GEMM against `ref`'s on random problems, in a child process, once per
    build and CPU (the verdict is cached). Used for the AMX kernel: it has not yet run on a
    machine of this project's, so it earns its place on each new one."""
    spec = importlib.util.find_spec(_module_name(path))
    st = os.stat(spec.origin)
    key = f"{spec.origin}|{st.st_size}|{st.st_mtime_ns}|{_C.cpu_paths()}|{platform.node()}"
    cache = CACHE / f"verified_{path}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    try:
        return bool(json.loads(cache.read_text())["ok"])
    except (OSError, ValueError, KeyError):
        pass
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    cmd = [sys.executable, "-c", _AGREE, _module_name(path), _module_name(ref)]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        worst = float(res.stdout.split()[-1]) if res.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        res, worst = None, None
    ok = worst is not None and worst < 2e-2
    if not ok:
        why = (
            f"failed (exit {res.returncode if res else 'none'})"
            if worst is None
            else f"is off by {worst:.3g}"
        )
        warnings.warn(FirpWarning(f"the {path} GEMM {why} against {ref}: {path} is not used"), stacklevel=3)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"ok": ok, "worst": worst}))
    except OSError:
        pass  # a read-only home: check again next time
    return ok


def _choose(runnable: dict[str, ModuleType], forced: str | None) -> str:
    """The best runnable path, or the forced one (never a path above what runs here)."""
    if not forced:
        return next(iter(runnable))
    if forced not in PATHS:
        best = next(iter(runnable))
        warnings.warn(
            FirpWarning(f"FIRP_CPU_ISA={forced}: no such path ({', '.join(PATHS)}); using {best}"),
            stacklevel=2,
        )
        return best
    below = [p for p in PATHS[PATHS.index(forced) :] if p in runnable]
    if below[0] != forced:
        why = "this CPU or OS does not run it" if forced not in CPU_PATHS else "this build does not hold it"
        warnings.warn(FirpWarning(f"FIRP_CPU_ISA={forced}: {why}; using {below[0]}"), stacklevel=2)
    return below[0]


CPU_PATHS: tuple[str, ...] = tuple(_C.cpu_paths())  # what the CPU and OS run, "amx" included
MODULES = _runnable()
ISA: str = _choose(MODULES, os.environ.get("FIRP_CPU_ISA"))  # the path the `cpu` backend runs
NAMES = {"cpu": ISA} | {f"cpu@{path}": path for path in MODULES}  # backend name -> path


def _pack_linear(module: ModuleType):
    def pack_linear(weight: torch.Tensor | QuantWeight) -> torch.Tensor:
        """Dense weights: panels for the bf16/fp32 kernels; GGUF blocks: a self-describing uint8
        pack for the quantized kernel (csrc/cpu/quant.cpp). `linear` tells them apart."""
        if isinstance(weight, QuantWeight):
            return module.pack_quant(weight.blocks, weight.kind, weight.act)
        return module.pack_linear(weight)

    return pack_linear


for _backend, _path in NAMES.items():
    for _name in OPS:
        register(_name, _backend)(getattr(MODULES[_path], _name))
    register("pack_linear", _backend)(_pack_linear(MODULES[_path]))


def variant(name: str) -> tuple[str, Any]:
    """(SIMD path, layer-stack factory) of backend `name` ("cpu" or "cpu@<path>")."""
    if name not in NAMES:
        raise FirpError(f"backend '{name}': this machine runs the cpu paths {', '.join(MODULES)}")
    module = MODULES[NAMES[name]]

    def layer_stack(model) -> Any:
        """The C++ layer loop over `model`'s weights (csrc/cpu/layers.cpp); tensors are shared."""
        cfg = model.cfg
        layers = [
            [lw.attn_norm, lw.ffn_norm]
            + [t for lin in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down) for t in lin.kernel_args()]
            for lw in model.layers
        ]
        return module.LayerStack(
            layers, model.cos, model.sin, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rms_eps, model.scale
        )

    return NAMES[name], layer_stack
