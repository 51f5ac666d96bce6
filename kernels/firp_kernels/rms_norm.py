"""RMSNorm, and RMSNorm fused with the residual add that precedes it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_last_dim_contiguous, pow2


@triton.jit
def rms_norm_kernel(
    x_ptr,  # [T, d]
    res_ptr,  # [T, d] residual, += x in place (only when HAS_RESIDUAL)
    w_ptr,  # [d]
    out_ptr,  # [T, d]
    eps,
    d,
    stride_x,
    stride_r,
    stride_o,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    in_ty = x_ptr.dtype.element_ty
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # residual.add_(x) rounds the sum to the residual's dtype; normalise that rounded value.
        in_ty = res_ptr.dtype.element_ty
        s = (x + r).to(in_ty)
        tl.store(res_ptr + row * stride_r + cols, s, mask=mask)
        x = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / d + eps)
    # Round to the input dtype before the weight, as the reference (and HF) do.
    y = (x * rstd).to(in_ty).to(tl.float32) * tl.load(w_ptr + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, res: torch.Tensor | None, weight: torch.Tensor, eps: float, out) -> torch.Tensor:
    d = x.shape[-1]
    src = res if res is not None else x
    if out is None:
        out = torch.empty(src.shape, dtype=torch.promote_types(src.dtype, weight.dtype), device=x.device)
    x2, out2 = x.reshape(-1, d), out.view(-1, d)
    r2 = res.view(-1, d) if res is not None else x2  # a view: the residual is updated in place
    for name, t in (("x", x2), ("residual", r2), ("out", out2), ("weight", weight)):
        check_last_dim_contiguous(name, t)
    if x2.shape[0] > 0:
        rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out2, eps, d, x2.stride(0), r2.stride(0), out2.stride(0),
            HAS_RESIDUAL=res is not None, BLOCK_D=pow2(d), num_warps=4 if d <= 2048 else 8,
        )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out=None) -> torch.Tensor:
    """See ops.rms_norm: x [T, d] -> [T, d]."""
    return _launch(x, None, weight, eps, out)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ops.add_rms_norm: residual += x in place, returns (rms_norm(residual), residual)."""
    return _launch(x, residual, weight, eps, None), residual
