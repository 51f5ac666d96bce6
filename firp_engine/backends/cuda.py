"""CUDA C++ backend: the kernels of `csrc/cuda`, bound as `firp_engine._C.cuda_<op>`.

Importing this module registers them for backend "cuda". It raises ImportError where they
cannot run (no CUDA device, or an extension built without CUDA), which `ops` reads as
"backend not available". Inputs the kernels are not built for (dtypes other than bf16/fp32,
mixed dtypes, head dims other than 64/128, GQA groups over 8, misaligned caches) run the
torch reference instead, so every call keeps the reference's semantics.
"""

from __future__ import annotations

import torch

from firp_engine import ops

if not torch.cuda.is_available():
    raise ImportError("the cuda backend needs a CUDA device")
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

_KERNEL_DTYPES = (torch.bfloat16, torch.float32)
_HEAD_DIMS = (64, 128)
_MAX_GROUP = 8


def _fits(*tensors: torch.Tensor) -> bool:
    """All on one CUDA device, sharing one dtype the kernels are built for."""
    first = tensors[0]
    return (
        first.is_cuda
        and first.dtype in _KERNEL_DTYPES
        and all(t.device == first.device and t.dtype == first.dtype for t in tensors[1:])
    )


def _packable(t: torch.Tensor) -> bool:
    """Rows the kernels read in 16-byte packs: aligned, last dim contiguous (mirrors bindings_cuda.cpp)."""
    pack = 16 // t.element_size()
    return (
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(s % pack == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1], strict=True) if n > 1)
    )


def _caches_fit(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    return k_cache.stride() == v_cache.stride() and _packable(k_cache) and _packable(v_cache)


def _heads_fit(heads: int, kv_heads: int, head_dim: int) -> bool:
    return head_dim in _HEAD_DIMS and heads % kv_heads == 0 and heads // kv_heads <= _MAX_GROUP


@ops.register("rms_norm", "cuda")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out=None) -> torch.Tensor:
    if not _fits(x, weight):
        return ops.rms_norm(x, weight, eps, out=out)
    return _C.cuda_rms_norm(x, weight, eps, out)


@ops.register("add_rms_norm", "cuda")
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if not _fits(x, residual, weight):
        return ops.add_rms_norm(x, residual, weight, eps)
    return _C.cuda_add_rms_norm(x, residual, weight, eps)


@ops.register("rope", "cuda")
def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if not (_fits(q, k) and cos.dtype == sin.dtype == torch.float32 and cos.device == q.device):
        return ops.rope(q, k, positions, cos, sin)
    return _C.cuda_rope(q, k, positions, cos, sin)


@ops.register("silu_mul", "cuda")
def silu_mul(gate_up: torch.Tensor, out=None) -> torch.Tensor:
    if not _fits(gate_up):
        return ops.silu_mul(gate_up, out=out)
    return _C.cuda_silu_mul(gate_up, out)


@ops.register("write_kv", "cuda")
def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    fits = (
        _fits(k_cache, v_cache)
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and _caches_fit(k_cache, v_cache)
        and k_cache.shape[-1] % (16 // k_cache.element_size()) == 0
        and k.device == v.device == slots.device == k_cache.device
    )
    if not fits:
        return ops.write_kv(k_cache, v_cache, k, v, slots)
    _C.cuda_write_kv(k_cache, v_cache, k, v, slots)


@ops.register("kv_commit", "cuda")
def kv_commit(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scratch: torch.Tensor,
    v_scratch: torch.Tensor,
    src_rows: torch.Tensor,
    dst_slots: torch.Tensor,
) -> None:
    row = k_cache.shape[-2] * k_cache.shape[-1]
    fits = (
        _fits(k_cache, v_cache)
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and _caches_fit(k_cache, v_cache)
        and row % (16 // k_cache.element_size()) == 0
        and k_scratch.device == v_scratch.device == src_rows.device == dst_slots.device == k_cache.device
    )
    if not fits:
        return ops.kv_commit(k_cache, v_cache, k_scratch, v_scratch, src_rows, dst_slots)
    _C.cuda_kv_commit(k_cache, v_cache, k_scratch, v_scratch, src_rows, dst_slots)


@ops.register("firp_project", "cuda")
def firp_project(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    fits = (
        _fits(h)
        and _fits(weight)
        and weight.device == h.device
        and h.shape[1] % 8 == 0
        and (bias is None or bias.device == h.device)
    )
    if not fits:
        return ops.firp_project(h, weight, bias, out=out)
    return _C.cuda_firp_project(h, weight, bias, out)


@ops.register("paged_decode_attention", "cuda")
def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out=None,
) -> torch.Tensor:
    fits = (
        _fits(q, k_cache, v_cache)
        and _caches_fit(k_cache, v_cache)
        and _heads_fit(q.shape[1], k_cache.shape[2], q.shape[2])
        and page_tables.device == context_lens.device == q.device
    )
    if not fits:
        return ops.paged_decode_attention(q, k_cache, v_cache, page_tables, context_lens, scale, out=out)
    return _C.cuda_paged_decode_attention(q, k_cache, v_cache, page_tables, context_lens, scale, out)


@ops.register("tree_attention", "cuda")
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
    fits = (
        _fits(q, k_cache, v_cache, k_new, v_new)
        and _caches_fit(k_cache, v_cache)
        and _heads_fit(q.shape[1], k_cache.shape[2], q.shape[2])
        and mask_bits.dtype == torch.int64
        and mask_bits.device == page_table.device == q.device
        and int(prefix_len) + k_new.shape[0] > 0
    )
    if not fits:
        return ops.tree_attention(
            q, k_cache, v_cache, page_table, prefix_len, k_new, v_new, mask_bits, scale, out=out
        )
    return _C.cuda_tree_attention(
        q, k_cache, v_cache, page_table, int(prefix_len), k_new, v_new, mask_bits, scale, out
    )
