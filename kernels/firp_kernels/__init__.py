"""firp_kernels: the Triton kernels of firp-engine (installed from `kernels/firp_kernels/`).

The folder `kernels/` itself has no `__init__.py` on purpose: a package importable as
`kernels` from the repo root would shadow Hugging Face's `kernels`, which transformers
imports (>= 5.25).

Each public function has the signature and semantics of the PyTorch reference of the
same name in `firp_engine.ops`; the attention ones also take a keyword-only
`num_splits` that forces the split-K factor (used by the tests).
"""

from .firp_project import firp_project
from .kv_commit import kv_commit
from .lse_merge import merge_partials
from .paged_decode_attention import paged_decode_attention
from .rms_norm import add_rms_norm, rms_norm
from .tree_attention import tree_attention
from .write_kv import write_kv

__all__ = [
    "add_rms_norm",
    "firp_project",
    "kv_commit",
    "merge_partials",
    "paged_decode_attention",
    "rms_norm",
    "tree_attention",
    "write_kv",
]
