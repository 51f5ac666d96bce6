"""CUDA C++ backend: the kernels of `csrc/cuda`, bound as `firp_engine._C.cuda_<op>`.

The bindings (csrc/cuda/bindings_cuda.cpp) take the reference's exact arguments, so they are
registered as they are. They check every input and raise on one the kernels do not run (a
CPU tensor, a dtype other than bf16/fp32, a head dim other than 64/128, a GQA group over 8,
...): `Backend.for_model` reads those checks once at start-up, and no call falls back to
the reference. The GEMMs have no kernel here: `linear` runs torch's (cuBLAS).
Importing this module raises ImportError when the extension was built without CUDA.
"""

from __future__ import annotations

import torch  # noqa: F401  (loaded before _C, which links against it)

from firp_engine.ops import register

try:
    from firp_engine import _C
except ImportError as e:
    raise ImportError(f"firp_engine._C is not built: {e}") from None

OPS = (
    "rms_norm",
    "add_rms_norm",
    "rope",
    "silu_mul",
    "write_kv",
    "kv_commit",
    "firp_project",
    "paged_decode_attention",
    "tree_attention",
)
_missing = [name for name in OPS if not hasattr(_C, f"cuda_{name}")]
if _missing:
    raise ImportError(f"firp_engine._C was built without CUDA kernels (no cuda_{_missing[0]})")

for _name in OPS:
    register(_name, "cuda")(getattr(_C, f"cuda_{_name}"))
