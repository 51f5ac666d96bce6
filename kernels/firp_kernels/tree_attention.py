"""Tree attention: one sequence's new rows against its paged prefix and the step's scratch rows.

The rows are the step's queries (prefill chunk, decode token, or FIRP tree + pseudo rows).
Each sees the whole paged prefix without a mask, and the scratch rows k_new/v_new where
the int64 bit mask allows (bit j % 64 of word j // 64: row may see scratch row j).

Grid: (row tiles, KV heads, parts). A row tile packs (query, head-in-group) pairs, so each
K/V tile is loaded once for all G query heads of a KV head. Parts 0 .. PP-1 each cover a
contiguous chunk of the prefix (split-K, so a small tree still fills the GPU); the last
part covers the scratch rows under the mask. The parts' results are merged by log-sum-exp
(`lse_merge`), or stored directly when there is a single part.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .lse_merge import merge_partials, new_partials, online_softmax_step
from .paged_decode_attention import attend_paged, auto_splits
from .utils import check_last_dim_contiguous, dot_precision, pow2


@triton.jit
def attend_scratch(
    q,  # fp32 [M, BLOCK_D] queries, already multiplied by scale * log2(e)
    acc,  # fp32 [M, BLOCK_D]
    m_i,  # fp32 [M]
    l_i,  # fp32 [M]
    kn_ptr,  # this KV head's scratch K [S, Hkv, D]
    vn_ptr,  # same for V (same strides)
    words_ptr,  # int64 pointers [M]: each row's first mask word
    row_mask,  # bool [M] rows that exist
    n_new,  # S, scratch rows
    stride_nt,  # scratch stride between rows
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,  # divides 64, so a key tile lies inside one mask word
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(0, n_new, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        valid = j < n_new
        word = tl.load(words_ptr + start // 64, mask=row_mask, other=0)
        bits = (word[:, None] >> (j % 64).to(tl.int64)[None, :]) & 1
        seen = (bits != 0) & valid[None, :]
        # Skip key tiles no row may see (most of them in a causal prefill).
        if tl.max(seen.to(tl.int32)) > 0:
            off = j[:, None] * stride_nt + offs_d[None, :]
            kv_mask = valid[:, None] & (offs_d[None, :] < D)
            k = tl.load(kn_ptr + off, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(vn_ptr + off, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            s = tl.where(seen, s, float("-inf"))
            acc, m_i, l_i = online_softmax_step(s, v, acc, m_i, l_i, DOT_PREC)
    return acc, m_i, l_i


# Sizes that change every step are not specialised on (value 1, multiple of 16), which would
# otherwise compile a new variant for many steps of a generation.
@triton.jit(do_not_specialize=["n_rows", "prefix_len", "chunk", "n_prefix_parts", "n_parts", "n_new"])
def tree_attention_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # one layer's cache [NB, BS, Hkv, D]
    v_ptr,  # [NB, BS, Hkv, D], same strides as k
    pt_ptr,  # int32 [P] page table
    kn_ptr,  # scratch K [S, Hkv, D]
    vn_ptr,  # scratch V [S, Hkv, D], same strides as kn
    mask_ptr,  # int64 [T, W] bit mask over the scratch rows
    out_ptr,  # [T, H, D] (written when DIRECT)
    part_ptr,  # fp32 [T * H, n_parts, D] (written unless DIRECT)
    lse_ptr,  # fp32 [T * H, n_parts]
    scale_log2,  # softmax scale * log2(e)
    n_rows,  # T * G
    H,
    prefix_len,
    chunk,  # prefix tokens per prefix part
    n_prefix_parts,
    n_parts,  # n_prefix_parts, plus one if there are scratch rows
    n_new,  # S
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_nt,
    stride_nh,
    stride_mt,
    stride_ot,
    stride_oh,
    G: tl.constexpr,  # query heads per KV head
    D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DIRECT: tl.constexpr,  # a single part: store the output, skip the merge
    DOT_PREC: tl.constexpr,
):
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = r < n_rows
    t = (r // G).to(tl.int64)
    head = kvh * G + r % G
    offs_d = tl.arange(0, BLOCK_D)
    qd_mask = row_mask[:, None] & (offs_d[None, :] < D)
    q = tl.load(q_ptr + t[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=qd_mask)
    q = q.to(tl.float32) * scale_log2

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if part < n_prefix_parts:
        lo = part * chunk
        hi = tl.minimum(lo + chunk, prefix_len)
        acc, m_i, l_i = attend_paged(
            q, acc, m_i, l_i, k_ptr + kvh * stride_kh, v_ptr + kvh * stride_kh, pt_ptr,
            lo, hi, stride_kb, stride_kt, BS, D, BLOCK_N, BLOCK_D, DOT_PREC,
        )  # fmt: skip
    else:
        acc, m_i, l_i = attend_scratch(
            q, acc, m_i, l_i, kn_ptr + kvh * stride_nh, vn_ptr + kvh * stride_nh, mask_ptr + t * stride_mt,
            row_mask, n_new, stride_nt, D, BLOCK_N, BLOCK_D, DOT_PREC,
        )  # fmt: skip

    # A row that saw no scratch row in this part has l = 0: store o = 0, lse = -inf.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if DIRECT:
        dst = out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=qd_mask)
    else:
        rows = t * H + head
        tl.store(part_ptr + (rows[:, None] * n_parts + part) * D + offs_d[None, :], o, mask=qd_mask)
        tl.store(lse_ptr + rows * n_parts + part, m_i + tl.log2(l_safe), mask=row_mask)


def tile_sizes(rows: int, d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) that stay clear of register spills on sm_90 (checked with ptxas).
    fp32 inputs take the FMA path of tl.dot, which needs much smaller tiles."""
    if dtype == torch.float32:
        return min(32, pow2(rows, 16)), 16
    block_m = min(64 if d <= 64 else 32, pow2(rows, 16))
    return block_m, 64 if block_m == 16 and d <= 64 else 32


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
    out: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """See ops.tree_attention. `num_splits` forces the number of prefix parts (tests)."""
    t, h, d = q.shape
    _, bs, hk, _ = k_cache.shape
    g, n_new = h // hk, k_new.shape[0]
    for name, x in (("q", q), ("k_cache", k_cache), ("k_new", k_new), ("mask_bits", mask_bits)):
        check_last_dim_contiguous(name, x)
    if v_cache.stride() != k_cache.stride():
        raise ValueError("K and V caches must share one layout")
    if v_new.stride() != k_new.stride():  # e.g. k from RoPE (contiguous), v a view of the qkv GEMM
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    if prefix_len == 0 and n_new == 0:
        raise ValueError("tree_attention: no keys to attend to")
    out = torch.empty_like(q) if out is None else out
    check_last_dim_contiguous("out", out)
    if t == 0:
        return out

    block_m, block_n = tile_sizes(t * g, d, q.dtype)
    m_tiles = triton.cdiv(t * g, block_m)
    prefix_parts, chunk = 0, 0
    if prefix_len > 0:
        want = num_splits or auto_splits(m_tiles * hk, prefix_len, q.device)
        chunk = triton.cdiv(triton.cdiv(prefix_len, want), block_n) * block_n
        prefix_parts = triton.cdiv(prefix_len, chunk)
    n_parts = prefix_parts + (n_new > 0)
    part, lse = new_partials(t * h, n_parts, d, q.device) if n_parts > 1 else (out, out)
    tree_attention_kernel[(m_tiles, hk, n_parts)](
        q, k_cache, v_cache, page_table, k_new, v_new, mask_bits, out, part, lse,
        scale * math.log2(math.e), t * g, h, prefix_len, chunk, prefix_parts, n_parts, n_new,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_new.stride(0), k_new.stride(1), mask_bits.stride(0), out.stride(0), out.stride(1),
        G=g, D=d, BS=bs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=pow2(d),
        DIRECT=n_parts == 1, DOT_PREC=dot_precision(q.dtype), num_warps=4,
    )  # fmt: skip
    if n_parts > 1:
        merge_partials(part, lse, out)
    return out
