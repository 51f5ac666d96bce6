"""FIRP projection: k linear maps applied to every tree node, written as pseudo rows.

With the k maps stacked as one [k * d, d] matrix, the product h @ W.T is [n, k * d], which
is exactly the pseudo-row layout [n * k, d] (row j * k + i = map i applied to node j). So
the whole projection is one GEMM (+ bias) whose output needs no reshuffling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_last_dim_contiguous, dot_precision, pow2


@triton.jit(do_not_specialize=["n"])  # the tree size varies from step to step
def firp_project_kernel(
    h_ptr,  # [n, d] tree nodes' hidden states
    w_ptr,  # [k * d, d] the k maps stacked, each out x in
    b_ptr,  # [k * d] stacked biases (unused unless HAS_BIAS)
    out_ptr,  # [n, k * d], i.e. pseudo rows [n * k, d]
    n,
    N,  # k * d
    K,  # d
    stride_hn,
    stride_wn,
    stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(h_ptr + rm[:, None] * stride_hn + rk[None, :], mask=(rm[:, None] < n) & (rk[None, :] < K))
        b = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None], mask=(rn[None, :] < N) & (rk[:, None] < K))
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N).to(tl.float32)[None, :]
    dst = out_ptr + rm[:, None] * stride_on + rn[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < n) & (rn[None, :] < N))


def firp_project(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """See ops.firp_project: h [n, d], weight [k, d, d], bias [k, d] or None -> [n * k, d]."""
    n, d = h.shape
    k = weight.shape[0]
    check_last_dim_contiguous("h", h)
    w = weight.reshape(k * d, d)  # a view for the usual contiguous weight
    b = bias.reshape(k * d) if bias is not None else w
    # The kernel writes a contiguous [n * k, d]; a strided `out` gets a copy afterwards.
    res = out if out is not None and out.is_contiguous() else h.new_empty(n * k, d)
    if n > 0:
        block_m = min(64, pow2(n, 16))
        grid = (triton.cdiv(n, block_m), triton.cdiv(k * d, 64))
        firp_project_kernel[grid](
            h, w, b, res, n, k * d, d, h.stride(0), w.stride(0), k * d,
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64,
            DOT_PREC=dot_precision(h.dtype), num_warps=4,
        )  # fmt: skip
    if out is not None and res is not out:
        out.copy_(res)
        return out
    return res
