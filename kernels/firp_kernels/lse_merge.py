"""Online-softmax helpers and the log-sum-exp merge of split attention results.

Attention over a long key range is cut into parts (split-K). Each part keeps a running
max `m`, a running sum `l` and an unnormalised accumulator `acc`, in the log2 domain
(scores are pre-multiplied by log2(e) so that exp2 can be used). A part ends either by
writing its normalised output straight away (one part only) or by writing
(acc / l, m + log2(l)) as a partial that `merge_partials` combines.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import pow2


@triton.jit
def online_softmax_step(
    s,  # fp32 [M, N] scores * scale * log2(e); -inf where a key is hidden
    v,  # fp32 [N, BLOCK_D] values of this key tile
    acc,  # fp32 [M, BLOCK_D] running sum of p @ v
    m_i,  # fp32 [M] running max
    l_i,  # fp32 [M] running sum of p
    DOT_PREC: tl.constexpr,
):
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["S"])  # the part count varies from call to call
def merge_kernel(
    part_ptr,  # fp32 [R, S, D] normalised partial outputs
    lse_ptr,  # fp32 [R, S] log2-sum-exp2 of each part (-inf, with output 0: the part saw no key)
    out_ptr,  # [R // H, H, D] through strides
    S,  # parts per row
    H,  # heads: row r is out[r // H, r % H]
    stride_o0,
    stride_o1,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + r * S + offs_s, mask=offs_s < S, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    mask = (offs_s[:, None] < S) & (offs_d[None, :] < D)
    o = tl.load(part_ptr + (r * S + offs_s[:, None]) * D + offs_d[None, :], mask=mask, other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    dst = out_ptr + (r // H) * stride_o0 + (r % H) * stride_o1 + offs_d
    tl.store(dst, res.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def new_partials(rows: int, parts: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch for split results: outputs fp32 [rows, parts, d], lse fp32 [rows, parts]."""
    part = torch.empty(rows, parts, d, dtype=torch.float32, device=device)
    lse = torch.empty(rows, parts, dtype=torch.float32, device=device)
    return part, lse


def merge_partials(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """part fp32 [R, S, D], lse fp32 [R, S] -> out [R // H, H, D] (any dtype, last dim contiguous)."""
    rows, parts, d = part.shape
    merge_kernel[(rows,)](
        part, lse, out, parts, out.shape[1], out.stride(0), out.stride(1),
        D=d, BLOCK_S=pow2(parts), BLOCK_D=pow2(d), num_warps=2,
    )  # fmt: skip
    return out
