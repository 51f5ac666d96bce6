"""Write one layer's new K/V rows into their cache slots (slot = block * BS + offset)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_last_dim_contiguous, pow2


@triton.jit
def copy_row(
    src_ptr,  # first element of one source row [Hkv, D]
    dst_ptr,  # first element of one cache slot [Hkv, D]
    stride_sh,  # source stride between heads
    stride_dh,  # cache stride between heads
    HK: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    hs = tl.arange(0, BLOCK_H)[:, None]
    ds = tl.arange(0, BLOCK_D)[None, :]
    mask = (hs < HK) & (ds < D)
    row = tl.load(src_ptr + hs * stride_sh + ds, mask=mask)
    tl.store(dst_ptr + hs * stride_dh + ds, row.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def write_kv_kernel(
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    kc_ptr,  # one layer's cache [NB, BS, Hkv, D]
    vc_ptr,  # [NB, BS, Hkv, D], same strides as kc
    slots_ptr,  # int64 [T]
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ct,
    stride_ch,
    BS: tl.constexpr,
    HK: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    dst = (slot // BS) * stride_cb + (slot % BS) * stride_ct
    copy_row(k_ptr + i * stride_kt, kc_ptr + dst, stride_kh, stride_ch, HK, D, BLOCK_H, BLOCK_D)
    copy_row(v_ptr + i * stride_vt, vc_ptr + dst, stride_vh, stride_ch, HK, D, BLOCK_H, BLOCK_D)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """See ops.write_kv: caches [NB, BS, Hkv, D]; k, v [T, Hkv, D]; slots int64 [T]."""
    _, bs, hk, d = k_cache.shape
    for name, t in (("k_cache", k_cache), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    if v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must share one layout")
    if k.shape[0] == 0:
        return
    write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BS=bs, HK=hk, D=d, BLOCK_H=pow2(hk), BLOCK_D=pow2(d), num_warps=1,
    )  # fmt: skip
