"""The CUDA sources without a GPU.

- Every csrc/cuda/*.cu compiles alone with nvcc for sm_80, with -Wall and torch's
  no-implicit-bf16/half defines, and without a warning (skipped if nvcc is missing).
- Slow (`-m slow`): the kernels run under the CPU emulation in csrc/cuda/emu (g++, C++20
  threads and barriers) against the torch references of firp_engine.ops.
"""

from __future__ import annotations

import ctypes as C
import math
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from firp_engine import ops

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc") or next(
    (p for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc",) if p.exists()), None
)
# torch's CUDAExtension compiles with these: the kernels must convert bf16 explicitly.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
JOBS = max(1, os.cpu_count() or 1)


def _nvcc(src: Path, out_dir: Path) -> tuple[int, str]:
    cmd = [str(NVCC), "-std=c++17", "-O3", "-arch=sm_80", "-Xcompiler", "-Wall", *TORCH_NVCC_DEFINES]
    cmd += ["-c", str(src), "-o", str(out_dir / f"{src.stem}.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return res.returncode, res.stdout + res.stderr


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """All sources compiled at once (the test time is the slowest file, not the sum)."""
    out = tmp_path_factory.mktemp("nvcc")
    with ThreadPoolExecutor(JOBS) as pool:
        return dict(zip((s.name for s in SOURCES), pool.map(lambda s: _nvcc(s, out), SOURCES), strict=True))


def test_sources_present():
    names = {s.name for s in SOURCES}
    assert {
        "decode_attention.cu",
        "tree_attention.cu",
        "merge_states.cu",
        "firp_project.cu",
        "kv.cu",
    } <= names
    assert (CUDA_DIR / "launchers.h").exists() and (CUDA_DIR / "bindings_cuda.cpp").exists()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles_without_warnings(src: Path, nvcc_results):
    rc, output = nvcc_results[src.name]
    assert rc == 0, output
    assert "warning" not in output.lower(), output


# ---------------------------------------------------------------- CPU emulation (slow)

EMU_DIR = CUDA_DIR / "emu"
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;(]*?>)?)<<<([^;]*?)>>>\(", re.S)
CXX = shutil.which(os.environ.get("CXX", "g++"))
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


def _build_emulated(work: Path) -> C.CDLL:
    """csrc/cuda compiled for the CPU: launches rewritten, CUDA headers replaced by emu/."""
    for f in [*CUDA_DIR.glob("*.cu"), *CUDA_DIR.glob("*.cuh"), CUDA_DIR / "launchers.h"]:
        text = LAUNCH.sub(r"::emu::Launcher(\2)(\1, ", f.read_text())
        (work / (f.stem + ".cpp" if f.suffix == ".cu" else f.name)).write_text(text)
    sources = [*sorted(work.glob("*.cpp")), EMU_DIR / "emu_runtime.cpp"]
    flags = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-fno-strict-aliasing", f"-I{EMU_DIR}", f"-I{work}"]

    def compile_one(src: Path) -> Path:
        obj = work / f"{src.stem}.o"
        subprocess.run([CXX, *flags, "-c", str(src), "-o", str(obj)], check=True, timeout=900)
        return obj

    with ThreadPoolExecutor(JOBS) as pool:
        objs = list(pool.map(compile_one, sources))
    lib = work / "libfirp_cuda_emu.so"
    subprocess.run([CXX, "-shared", "-pthread", "-o", str(lib), *map(str, objs)], check=True)
    return C.CDLL(str(lib))


class PagedKV(C.Structure):  # FirpPagedKV in launchers.h
    _fields_ = [
        ("k", C.c_void_p),
        ("v", C.c_void_p),
        ("block_stride", C.c_int64),
        ("token_stride", C.c_int64),
        ("head_stride", C.c_int64),
        ("block_size", C.c_int),
    ]


_P, _L, _I, _F, _IP = C.c_void_p, C.c_int64, C.c_int, C.c_float, C.POINTER(C.c_int)
SIGNATURES = {
    "launch_rms_norm": [_I, _P, _L, _P, _P, _L, _I, _I, _F, _P],
    "launch_add_rms_norm": [_I, _P, _L, _P, _L, _P, _P, _L, _I, _I, _F, _P],
    "launch_rope": [_I, _P, _L, _L, _P, _L, _L, _P, _P, _P, _P, _P, _I, _I, _I, _I, _P],
    "launch_silu_mul": [_I, _P, _L, _P, _L, _I, _I, _P],
    "launch_write_kv": [_I, _P, _P, _P, _L, _L, _P, _L, _L, _P, _I, _I, _I, _P],
    "launch_kv_commit": [_I, _P, _P, _L, _P, _P, _L, _L, _P, _P, _I, _I, _I, _P],
    "launch_firp_project": [_I, _I, _P, _L, _P, _P, _P, _L, _I, _I, _I, _P],
    "firp_decode_plan": [_I, _I, _I, _I, _IP, _IP],
    "launch_paged_decode_attention": [
        _I,
        _P,
        PagedKV,
        _P,
        _L,
        _P,
        _I,
        _I,
        _I,
        _I,
        _F,
        _I,
        _I,
        _P,
        _P,
        _P,
        _P,
    ],
    "firp_tree_plan": [_I, _I, _I, _I, _I, _I, _IP, _IP, _IP],
    "launch_tree_attention": [
        *[_I, _P, PagedKV, _P, _I, _P, _P, _L, _L, _I, _P, _I],
        *[_I, _I, _I, _I, _F, _I, _I, _I, _P, _P, _P, _P],
    ],
}
DTYPE = {torch.float32: 0, torch.bfloat16: 1}  # FirpDtype


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = _build_emulated(tmp_path_factory.mktemp("cuda_emu"))

    class Lib:
        def __getattr__(self, name):
            fn = getattr(lib, name)
            fn.argtypes = SIGNATURES[name]
            if name.startswith("launch_"):
                return lambda *args: _check(fn(*(_arg(a) for a in args)))
            return fn

    return Lib()


def _arg(a):
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    if isinstance(a, torch.dtype):
        return DTYPE[a]
    return a


def _check(err: int) -> None:
    assert err == 0, f"launcher returned cudaError {err}"


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(got).all()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol, f"max error {err} > {tol}"


def _paged_kv(k_cache: torch.Tensor, v_cache: torch.Tensor) -> PagedKV:
    return PagedKV(k_cache.data_ptr(), v_cache.data_ptr(), *k_cache.stride()[:3], k_cache.shape[1])


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_norm_rope_silu_kv(emu, dtype):
    exact = 0.0
    x = torch.randn(5, 96, dtype=dtype)  # [T, d]
    w = torch.randn(96, dtype=dtype)
    out = torch.full_like(x, float("nan"))
    emu.launch_rms_norm(dtype, x, 96, w, out, 96, 5, 96, 1e-5, None)
    _close(out, ops.rms_norm(x, w, 1e-5), 1e-6 if dtype == torch.float32 else 0.02)
    res = torch.randn(5, 96, dtype=dtype)
    ref_norm, ref_res = ops.add_rms_norm(x, res.clone(), w, 1e-5)
    emu.launch_add_rms_norm(dtype, x, 96, res, 96, w, out, 96, 5, 96, 1e-5, None)
    _close(res, ref_res, exact)
    _close(out, ref_norm, 1e-5 if dtype == torch.float32 else 0.02)

    t, h, hk, d = 4, 3, 1, 16
    qkv = torch.randn(t, (h + 2 * hk) * d, dtype=dtype)  # strided q, k views
    q, k = qkv[:, : h * d].view(t, h, d), qkv[:, h * d : (h + hk) * d].view(t, hk, d)
    pos = torch.tensor([0, 5, 2, 9])
    ang = torch.arange(16).float()[:, None] / (1e4 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = ang.cos(), ang.sin()  # [max_pos, D/2]
    q_out, k_out = torch.empty(t, h, d, dtype=dtype), torch.empty(t, hk, d, dtype=dtype)
    emu.launch_rope(
        dtype, q, *q.stride()[:2], k, *k.stride()[:2], pos, cos, sin, q_out, k_out, t, h, hk, d, None
    )
    ref_q, ref_k = ops.rope(q, k, pos, cos, sin)
    _close(q_out, ref_q, exact)
    _close(k_out, ref_k, exact)

    gate_up = torch.randn(3, 80, dtype=dtype)  # [T, 2F]
    act = torch.empty(3, 40, dtype=dtype)
    emu.launch_silu_mul(dtype, gate_up, 80, act, 40, 3, 40, None)
    _close(act, ops.silu_mul(gate_up), 1e-6)

    n_layers, nb, bs = 3, 6, 4
    kc = torch.randn(n_layers, nb, bs, 2, d, dtype=dtype)  # [L, NB, BS, Hkv, D]
    vc = torch.randn_like(kc)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kv = torch.randn(5, 2, 2, d, dtype=dtype)
    k_new, v_new = kv[:, 0], kv[:, 1]  # strided [T, Hkv, D]
    slots = torch.tensor([3, 17, 0, 22, 9])
    emu.launch_write_kv(
        dtype, kc[1], vc[1], k_new, *k_new.stride()[:2], v_new, *v_new.stride()[:2], slots, 5, 2, d, None
    )
    ops.write_kv(kc_ref[1], vc_ref[1], k_new, v_new, slots)
    ks, vs = torch.randn(n_layers, 7, 2, d, dtype=dtype), torch.randn(n_layers, 7, 2, d, dtype=dtype)
    src, dst = torch.tensor([0, 2, 5]), torch.tensor([1, 10, 23])
    emu.launch_kv_commit(
        dtype, kc, vc, kc.stride(0), ks, vs, ks.stride(0), ks.stride(1), src, dst, n_layers, 3, 2 * d, None
    )
    ops.kv_commit(kc_ref, vc_ref, ks, vs, src, dst)
    _close(kc, kc_ref, exact)
    _close(vc, vc_ref, exact)


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize(
    "act,wt,bias",
    [
        (torch.float32, torch.float32, True),
        (torch.bfloat16, torch.bfloat16, False),
        (torch.bfloat16, torch.float32, True),
    ],
)
def test_emulated_firp_project(emu, act, wt, bias):
    n, k, d = 11, 3, 72
    h = torch.randn(n, d + 8, dtype=act)[:, :d]  # rows d + 8 apart
    w = torch.randn(k, d, d, dtype=wt) / 8
    b = torch.randn(k, d) if bias else None
    buf = torch.full((n * k + 2, d), float("nan"), dtype=act)
    out = buf[1:-1]  # written in place, between untouched rows
    emu.launch_firp_project(act, wt, h, h.stride(0), w, b, out, d, n, k, d, None)
    _close(out, ops.firp_project(h, w, b), 1e-4 if act == torch.float32 else 0.05)
    assert buf[0].isnan().all() and buf[-1].isnan().all()


def _pages(lengths: list[int], kv_heads: int, d: int, dtype, bs: int = 16):
    nb = 64
    k_cache = torch.randn(nb, bs, kv_heads, d, dtype=dtype)  # [NB, BS, Hkv, D]
    width = max(1, *(math.ceil(n / bs) for n in lengths))
    table = torch.randperm(nb)[: len(lengths) * width].view(len(lengths), width).to(torch.int32)
    return k_cache, torch.randn_like(k_cache), table


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize(
    "dtype,heads,kv_heads,d,lengths,sms",
    [
        (
            torch.float32,
            9,
            3,
            64,
            [1, 37, 300],
            1000,
        ),  # G=3 (built as 4), 3 splits, splits past short contexts
        (torch.bfloat16, 4, 2, 128, [260, 0, 129], 1000),  # several splits, an empty context
        (torch.float32, 8, 1, 64, [100], 1),  # G=8, one split: written directly
        (torch.bfloat16, 4, 4, 128, [0, 5], 1),  # G=1, one split, an empty context
    ],
)
def test_emulated_paged_decode(emu, dtype, heads, kv_heads, d, lengths, sms):
    batch, bs = len(lengths), 16
    k_cache, v_cache, table = _pages(lengths, kv_heads, d, dtype, bs)
    q = torch.randn(batch, heads, d, dtype=dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    splits, tokens = C.c_int(), C.c_int()
    emu.firp_decode_plan(batch, kv_heads, table.shape[1] * bs, sms, C.byref(splits), C.byref(tokens))
    out = torch.full_like(q, float("nan"))
    part_o = torch.full((batch * heads, splits.value, d), float("nan"))
    part_lse = torch.full((batch * heads, splits.value), float("nan"))
    emu.launch_paged_decode_attention(
        dtype,
        q,
        _paged_kv(k_cache, v_cache),
        table,
        table.stride(0),
        lens,
        batch,
        heads,
        kv_heads,
        d,
        d**-0.5,
        splits.value,
        tokens.value,
        out,
        part_o,
        part_lse,
        None,
    )
    ref = ops.paged_decode_attention(q, k_cache, v_cache, table, lens, d**-0.5)
    _close(out, ref, 2e-5 if dtype == torch.float32 else 0.02)


def _tree_allowed(rows: int, kind: str) -> torch.Tensor:
    if kind == "causal":  # prefill: row i sees scratch rows 0..i
        return torch.tril(torch.ones(rows, rows, dtype=torch.bool))
    allowed = torch.zeros(rows, rows, dtype=torch.bool)
    for i in range(rows):  # itself and a random subset of earlier rows
        allowed[i, :i] = torch.rand(i) < 0.5
        allowed[i, i] = True
    allowed[rows // 2] = False  # a row that sees only the prefix
    return allowed


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize(
    "dtype,heads,kv_heads,d,prefix,rows,kind,sms",
    [
        (torch.float32, 9, 3, 64, 100, 7, "tree", 1),  # prefix split + scratch split
        (torch.bfloat16, 4, 2, 128, 150, 20, "tree", 100),  # several prefix splits
        (torch.float32, 2, 1, 64, 0, 70, "causal", 1),  # prefill: one split, direct write, tile skipping
        (torch.float32, 2, 2, 64, 40, 70, "causal", 100),  # chunked prefill, split scratch
    ],
)
def test_emulated_tree_attention(emu, dtype, heads, kv_heads, d, prefix, rows, kind, sms):
    k_cache, v_cache, table = _pages([max(prefix, 1)], kv_heads, d, dtype)
    table = table[0]
    q = torch.randn(rows, heads, d, dtype=dtype)  # [T, H, D]
    kv = torch.randn(rows, 3, kv_heads, d, dtype=dtype)
    k_new, v_new = kv[:, 0], kv[:, 1]  # strided scratch [S, Hkv, D]
    mask = ops.pack_mask(_tree_allowed(rows, kind))
    splits, prefix_splits, tokens = C.c_int(), C.c_int(), C.c_int()
    emu.firp_tree_plan(
        rows, heads, kv_heads, prefix, rows, sms, C.byref(splits), C.byref(prefix_splits), C.byref(tokens)
    )
    out = torch.full_like(q, float("nan"))
    part_o = torch.full((rows * heads, splits.value, d), float("nan"))
    part_lse = torch.full((rows * heads, splits.value), float("nan"))
    emu.launch_tree_attention(
        dtype,
        q,
        _paged_kv(k_cache, v_cache),
        table,
        prefix,
        k_new,
        v_new,
        *k_new.stride()[:2],
        rows,
        mask,
        mask.shape[1],
        rows,
        heads,
        kv_heads,
        d,
        d**-0.5,
        splits.value,
        prefix_splits.value,
        tokens.value,
        out,
        part_o,
        part_lse,
        None,
    )
    ref = ops.tree_attention(q, k_cache, v_cache, table, prefix, k_new, v_new, mask, d**-0.5)
    _close(out, ref, 2e-5 if dtype == torch.float32 else 0.02)
