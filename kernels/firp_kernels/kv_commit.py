"""Commit the accepted scratch rows into the paged cache, for all layers in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_last_dim_contiguous, pow2
from .write_kv import copy_row


@triton.jit
def kv_commit_kernel(
    ks_ptr,  # scratch K [L, S, Hkv, D]
    vs_ptr,  # scratch V [L, S, Hkv, D], same strides as ks
    kc_ptr,  # cache K [L, NB, BS, Hkv, D]
    vc_ptr,  # cache V [L, NB, BS, Hkv, D], same strides as kc
    src_ptr,  # int64 [m] scratch rows to keep
    dst_ptr,  # int64 [m] their cache slots
    stride_sl,
    stride_st,
    stride_sh,
    stride_cl,
    stride_cb,
    stride_ct,
    stride_ch,
    BS: tl.constexpr,
    HK: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    src = layer * stride_sl + tl.load(src_ptr + i).to(tl.int64) * stride_st
    slot = tl.load(dst_ptr + i).to(tl.int64)
    dst = layer * stride_cl + (slot // BS) * stride_cb + (slot % BS) * stride_ct
    copy_row(ks_ptr + src, kc_ptr + dst, stride_sh, stride_ch, HK, D, BLOCK_H, BLOCK_D)
    copy_row(vs_ptr + src, vc_ptr + dst, stride_sh, stride_ch, HK, D, BLOCK_H, BLOCK_D)


def kv_commit(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scratch: torch.Tensor,
    v_scratch: torch.Tensor,
    src_rows: torch.Tensor,
    dst_slots: torch.Tensor,
) -> None:
    """See ops.kv_commit: caches [L, NB, BS, Hkv, D], scratch [L, S, Hkv, D], rows/slots int64 [m]."""
    n_layers, _, bs, hk, d = k_cache.shape
    for name, t in (("k_cache", k_cache), ("k_scratch", k_scratch)):
        check_last_dim_contiguous(name, t)
    if v_cache.stride() != k_cache.stride() or v_scratch.stride() != k_scratch.stride():
        raise ValueError("K and V must share one layout")
    if src_rows.numel() == 0:
        return
    kv_commit_kernel[(src_rows.numel(), n_layers)](
        k_scratch, v_scratch, k_cache, v_cache, src_rows, dst_slots,
        k_scratch.stride(0), k_scratch.stride(1), k_scratch.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        BS=bs, HK=hk, D=d, BLOCK_H=pow2(hk), BLOCK_D=pow2(d), num_warps=1,
    )  # fmt: skip
