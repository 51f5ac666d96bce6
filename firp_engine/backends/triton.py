"""Triton backend: registers the kernels of `kernels/` (package `firp_kernels`) as ops.

Runs on a CUDA GPU, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set
before triton is first imported; slow, meant for tests): `Backend.create` checks which.
The kernels raise on an input they cannot run; rope, silu_mul and the GEMMs have none here.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
import triton  # noqa: F401  (ImportError here = backend unavailable)

from firp_engine.ops import register


def _load_kernels() -> ModuleType:
    try:
        return importlib.import_module("firp_kernels")
    except ModuleNotFoundError as e:
        if e.name != "firp_kernels":
            raise
    # A source checkout that was not installed: load kernels/ under its installed name.
    root = Path(__file__).resolve().parents[2] / "kernels" / "firp_kernels"
    spec = importlib.util.spec_from_file_location(
        "firp_kernels", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"firp_kernels is not installed and {root} has no kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["firp_kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["firp_kernels"]
        raise
    return module


K = _load_kernels()

register("rms_norm", "triton")(K.rms_norm)
register("add_rms_norm", "triton")(K.add_rms_norm)
register("write_kv", "triton")(K.write_kv)
register("kv_commit", "triton")(K.kv_commit)
register("firp_project", "triton")(K.firp_project)


# The attention kernels take an extra keyword (num_splits, for tests); register them
# under the reference's exact signature.
@register("paged_decode_attention", "triton")
def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out=None,
) -> torch.Tensor:
    return K.paged_decode_attention(q, k_cache, v_cache, page_tables, context_lens, scale, out)


@register("tree_attention", "triton")
def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    prefix_len: int,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    mask_bits: torch.Tensor,
    scale: float,
    out=None,
) -> torch.Tensor:
    return K.tree_attention(q, k_cache, v_cache, page_table, prefix_len, k_new, v_new, mask_bits, scale, out)
