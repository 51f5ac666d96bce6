"""Build firp-engine and its C++ modules (ninja, through torch.utils.cpp_extension): the CPU
kernels once per SIMD path, `firp_engine._C` (portable, plus the CUDA kernels) and
`firp_engine._C_avx2`, `_C_avx512`, `_C_avx512bf16`, `_C_amx`, whichever the compiler can build,
whatever CPU builds them. The cpu backend loads the best one the running CPU supports
(firp_engine/backends/cpu.py), so a build carried to another machine still runs right.

Install torch first, then `pip install .` or `pip install -e .` (with build isolation, pip
builds against that same torch version: scripts/build_backend.py), `pip install -e .
--no-build-isolation` (builds against the installed torch itself, and fetches nothing) or
`python setup.py build_ext --inplace`. The CUDA kernels are built too when torch has CUDA
and finds a CUDA toolkit (set CUDA_HOME when it guesses wrong). Environment knobs:
    FIRP_CPU_PATHS        the SIMD variants to build besides the portable one, e.g. "avx2"
                          (default: every one the compiler accepts; "" builds the portable one only)
    FIRP_NO_CUDA=1        skip the CUDA kernels even when torch and nvcc have CUDA
    TORCH_CUDA_ARCH_LIST  GPU architectures to build for, e.g. "9.0" (default: the visible
                          GPUs', or DEFAULT_CUDA_ARCHS when there is none)
    MAX_JOBS              parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import platform
import subprocess
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "firp-engine builds its C++ extension against torch, and there is none here: "
        "run `pip install torch` first, then `pip install .` (or `pip install -e . --no-build-isolation`)."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))

# SIMD paths, best first: (name, compiler flags). The kernels are written once against
# csrc/cpu/simd.h, which picks its code from these flags.
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
# GCC 12's AVX-512 headers trip its own (maybe-)uninitialized warnings (GCC bug 105593).
_AVX512 = [
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    *_AVX2,
    "-Wno-uninitialized",
    "-Wno-maybe-uninitialized",
]
SIMD_PATHS = [
    ("amx", [*_AVX512, "-mavx512bf16", "-mavx512vnni", "-mamx-tile", "-mamx-bf16"]),  # + linear_amx.cpp
    ("avx512bf16", [*_AVX512, "-mavx512bf16", "-mavx512vnni"]),  # VNNI: csrc/cpu/quant_vnni.h
    ("avx512", _AVX512),
    ("avx2", _AVX2),
]


def compiler_accepts(flags: list[str]) -> bool:
    """True when the C++ compiler builds an empty file with these flags."""
    cxx = os.environ.get("CXX", "c++")
    try:
        res = subprocess.run(
            [cxx, *flags, "-x", "c++", "-c", "-o", os.devnull, "-"],
            input=b"int f() { return 0; }\n",
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def simd_paths() -> list[tuple[str, list[str]]]:
    """The SIMD variants to build: those the compiler accepts (x86-64 only), or FIRP_CPU_PATHS."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    wanted = os.environ.get("FIRP_CPU_PATHS")
    chosen = [(n, f) for n, f in SIMD_PATHS if wanted is None or n in wanted.replace(",", " ").split()]
    out = [(n, f) for n, f in chosen if compiler_accepts(f)]
    print(f"firp-engine: building the CPU kernels for {', '.join(['portable'] + [n for n, _ in out])}")
    return out


# The GPU architectures built for when no GPU is visible to pick them from (torch's own
# detection fails then): those of the CUDA compile check in CMakeLists.txt, plus PTX that
# newer GPUs compile at load.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def with_cuda() -> bool:
    """True when torch has CUDA and torch's CUDA_HOME holds a CUDA toolkit (nvcc and its headers)."""
    if not torch.version.cuda or os.environ.get("FIRP_NO_CUDA"):
        return False
    home = cpp_extension.CUDA_HOME  # $CUDA_HOME, else guessed from the nvcc on PATH, else /usr/local/cuda
    if home and all(os.path.exists(os.path.join(home, f)) for f in ("bin/nvcc", "include/cuda_runtime.h")):
        return True
    print(
        f"firp-engine: no CUDA toolkit (bin/nvcc, include/cuda_runtime.h) in CUDA_HOME={home}: "
        "building the CPU kernels only"
    )
    return False


def sources(pattern: str) -> list[str]:
    return sorted(glob.glob(pattern, root_dir=ROOT))


def extensions() -> list:
    """firp_engine._C (portable CPU kernels, plus the CUDA ones, ops named cuda_*, when torch has
    CUDA) and one firp_engine._C_<path> per SIMD path."""
    cpu_srcs = ["csrc/bindings.cpp", *sources("csrc/cpu/*.cpp")]
    cxx = ["-O3", "-g0"]  # -g0: no debug info, builds faster
    link = []
    if torch.backends.openmp.is_available() and compiler_accepts(["-fopenmp"]):
        cxx.append("-fopenmp")  # at::parallel_for is inline: without it the kernels run on one thread
        link.append("-fopenmp")
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=link)
    variants = [
        cpp_extension.CppExtension(name=f"firp_engine._C_{name}", sources=cpu_srcs,
                                   extra_compile_args={"cxx": [*cxx, *flags]}, **common)
        for name, flags in simd_paths()
    ]  # fmt: skip
    if not with_cuda():
        base = cpp_extension.CppExtension(
            name="firp_engine._C", sources=cpu_srcs, extra_compile_args={"cxx": cxx}, **common
        )
        return [base, *variants]
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs and torch.cuda.device_count() == 0:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    print(f"firp-engine: building the CUDA kernels too, for {archs or 'the visible GPUs'}")
    srcs = [*cpu_srcs, *sources("csrc/cuda/*.cu"), "csrc/cuda/bindings_cuda.cpp"]
    nvcc = ["-O3", "--expt-relaxed-constexpr"]
    base = cpp_extension.CUDAExtension(  # -DFIRP_WITH_CUDA: bindings.cpp then calls register_cuda()
        name="firp_engine._C",
        sources=srcs,
        extra_compile_args={"cxx": [*cxx, "-DFIRP_WITH_CUDA"], "nvcc": nvcc},
        **common,
    )
    return [base, *variants]


setup(
    name="firp-engine",
    version="0.1.0",
    description="A small LLaMA-family inference runtime with its own kernels and FIRP speculative decoding",
    python_requires=">=3.10",
    packages=find_packages(include=["firp_engine", "firp_engine.*"]) + ["firp_kernels"],
    package_dir={"firp_kernels": "kernels/firp_kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["firp = firp_engine.cli:main"]},
    install_requires=[
        f"torch=={torch.__version__}",  # the extension loads only into the torch it was built against
        "numpy",
        "safetensors",
        "gguf",
        "tokenizers",
        "sentencepiece",
        "jinja2",
        "tqdm",
        "matplotlib",
        "protobuf",  # SentencePiece model files rebuilt from GGUF metadata
    ],
    # transformers (+ accelerate for its GGUF loader) is the reference the tests compare against.
    extras_require={
        "serve": ["fastapi", "uvicorn"],
        # benchmarks/peers.py: llama.cpp on the same GGUF (an sdist: it compiles llama.cpp)
        "peers": ["llama-cpp-python"],
        # openai + httpx: the server tests drive a live server through the official client
        "test": [
            *("pytest", "transformers", "accelerate", "triton", "ruff"),
            *("fastapi", "uvicorn", "openai", "httpx"),
        ],
    },
    package_data={"firp_engine": ["heads/*.json", "heads/*.safetensors"]},
    zip_safe=False,
)
