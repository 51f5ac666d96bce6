"""Small launch helpers shared by the kernel wrappers (host side only)."""

from __future__ import annotations

import functools

import torch
import triton


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for operands loaded from `dtype` and upcast to fp32.

    bf16/fp16 values are exact in tf32, so tf32 tensor cores lose nothing there;
    genuine fp32 inputs keep full precision ("ieee")."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; a small stand-in under the CPU interpreter."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2


def pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(n))


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    # Kernels index the last dimension with unit stride; everything else goes through strides.
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride {t.stride()})")
