"""Paged decode attention: one query per sequence, many sequences, GQA, split-K.

One program handles one (sequence, KV head, split): all G = H / Hkv query heads that share
the KV head are packed as the rows of one tile, so each K/V tile is loaded once for the
whole group. Keys are gathered token by token through the int32 page table, so the key
tile size does not depend on the cache block size. Long contexts are cut into SPLITS
parts whose results `lse_merge.merge_partials` combines; the split length is derived
from the context length on the device, so no host sync is needed.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .lse_merge import merge_partials, new_partials, online_softmax_step
from .utils import check_last_dim_contiguous, dot_precision, num_sms, pow2

MIN_CHUNK = 256  # tokens per split below which splitting costs more than it gains


@triton.jit
def attend_paged(
    q,  # fp32 [M, BLOCK_D] queries, already multiplied by scale * log2(e)
    acc,  # fp32 [M, BLOCK_D]
    m_i,  # fp32 [M]
    l_i,  # fp32 [M]
    k_ptr,  # this KV head's K in one layer's cache [NB, BS, Hkv, D]
    v_ptr,  # same for V (same strides as K)
    pt_ptr,  # int32 [P] this sequence's page table
    lo,  # first token position to attend
    hi,  # one past the last token position
    stride_kb,  # cache stride between blocks
    stride_kt,  # cache stride between tokens of a block
    BS: tl.constexpr,  # tokens per cache block
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Every row sees every token in [lo, hi): the unmasked paged prefix."""
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        valid = t < hi
        page = tl.load(pt_ptr + t // BS, mask=valid, other=0).to(tl.int64)
        off = page[:, None] * stride_kb + (t % BS)[:, None] * stride_kt + offs_d[None, :]
        kv_mask = valid[:, None] & (offs_d[None, :] < D)
        k = tl.load(k_ptr + off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        s = tl.where(valid[None, :], s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(s, v, acc, m_i, l_i, DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def paged_decode_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # one layer's cache [NB, BS, Hkv, D]
    v_ptr,  # [NB, BS, Hkv, D], same strides as k
    pt_ptr,  # int32 [B, P]
    lens_ptr,  # int32 [B] tokens in the cache per sequence
    out_ptr,  # [B, H, D] (written when SPLITS == 1)
    part_ptr,  # fp32 [B * H, SPLITS, D] (written when SPLITS > 1)
    lse_ptr,  # fp32 [B * H, SPLITS]
    scale_log2,  # softmax scale * log2(e)
    H,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_pb,
    stride_ob,
    stride_oh,
    SPLITS: tl.constexpr,
    BS: tl.constexpr,
    G: tl.constexpr,  # query heads per KV head
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    # Equal shares of this sequence's context, whole key tiles each; late splits may be empty.
    chunk = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, ctx)

    heads = kvh * G + tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = tl.arange(0, BLOCK_G) < G
    qd_mask = row_mask[:, None] & (offs_d[None, :] < D)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=qd_mask, other=0.0)
    q = q.to(tl.float32) * scale_log2

    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc, m_i, l_i = attend_paged(
        q, acc, m_i, l_i, k_ptr + kvh * stride_kh, v_ptr + kvh * stride_kh, pt_ptr + b * stride_pb,
        lo, hi, stride_kb, stride_kt, BS, D, BLOCK_N, BLOCK_D, DOT_PREC,
    )  # fmt: skip

    # An empty split (past the context) has l = 0 and m = -inf: store o = 0, lse = -inf.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if SPLITS == 1:
        dst = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=qd_mask)
    else:
        rows = b * H + heads
        tl.store(part_ptr + (rows[:, None] * SPLITS + split) * D + offs_d[None, :], o, mask=qd_mask)
        tl.store(lse_ptr + rows * SPLITS + split, m_i + tl.log2(l_safe), mask=row_mask)


def auto_splits(programs: int, max_tokens: int, device: torch.device) -> int:
    """Splits per (sequence, head) so that about two programs run per SM, never below MIN_CHUNK tokens."""
    want = triton.cdiv(2 * num_sms(device), programs)
    return max(1, min(want, triton.cdiv(max_tokens, MIN_CHUNK)))


def key_tile(d: int, dtype: torch.dtype) -> int:
    """Keys per tile, sized to stay clear of register spills on sm_90 (checked with ptxas)."""
    if d <= 64:
        return 64
    return 16 if dtype == torch.float32 else 32


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """See ops.paged_decode_attention. `num_splits` forces the split-K factor (tests)."""
    b, h, d = q.shape
    _, bs, hk, _ = k_cache.shape
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("page_tables", page_tables)):
        check_last_dim_contiguous(name, t)
    if v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must share one layout")
    out = torch.empty_like(q) if out is None else out
    check_last_dim_contiguous("out", out)
    if b == 0:
        return out
    splits = num_splits or auto_splits(b * hk, page_tables.shape[1] * bs, q.device)
    part, lse = new_partials(b * h, splits, d, q.device) if splits > 1 else (out, out)
    paged_decode_kernel[(b, hk, splits)](
        q, k_cache, v_cache, page_tables, context_lens, out, part, lse,
        scale * math.log2(math.e), h,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        page_tables.stride(0), out.stride(0), out.stride(1),
        SPLITS=splits, BS=bs, G=h // hk, D=d,
        BLOCK_G=pow2(h // hk, 16), BLOCK_N=key_tile(d, q.dtype), BLOCK_D=pow2(d),
        DOT_PREC=dot_precision(q.dtype), num_warps=4,
    )  # fmt: skip
    if splits > 1:
        merge_partials(part, lse, out)
    return out
