"""Op dispatch: one table from each op to its backends, plus the PyTorch references.

Every op has a `torch` implementation here (the reference, runs everywhere). Other
backends (`cpu` = our C++ in `csrc/cpu`, `triton` = `kernels/`, `cuda` = `csrc/cuda`)
register faster versions from `firp_engine/backends/<name>.py`; an op a backend lacks
falls back to the reference. The backend is chosen once per run (`set_backend`,
`--backend`, or the `FIRP_BACKEND` environment variable).

Shapes used throughout (one layer's cache is `k_cache[l]`):
    k_cache, v_cache   [L, num_blocks, block_size, n_kv_heads, head_dim]
    page table         int32 [max_pages] (one sequence) or [B, max_pages]
    slot               block_id * block_size + offset, int64
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from firp_engine.errors import FirpError

BACKENDS = ("torch", "cpu", "triton", "cuda")
_TABLE: dict[str, dict[str, Callable]] = {}
_active = "torch"


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        _TABLE.setdefault(op, {})[backend] = fn
        return fn

    return deco


def _load_backend(name: str) -> None:
    if name == "torch":
        return
    try:
        importlib.import_module(f"firp_engine.backends.{name}")
    except (ImportError, OSError, RuntimeError) as e:
        raise FirpError(f"backend '{name}' is not available here: {e}") from None


def available_backends() -> list[str]:
    """Backends whose module imports on this machine (torch always)."""
    out = []
    for name in BACKENDS:
        try:
            _load_backend(name)
            out.append(name)
        except FirpError:
            pass
    return out


def set_backend(name: str | None = None) -> str:
    """Select the backend for this run; None reads FIRP_BACKEND, else the best available."""
    global _active
    if name is None:
        name = os.environ.get("FIRP_BACKEND") or default_backend()
    if name not in BACKENDS:
        raise FirpError(f"unknown backend '{name}' (choose from {', '.join(BACKENDS)})")
    _load_backend(name)
    _active = name
    return name


def default_backend() -> str:
    return "cpu" if "cpu" in available_backends() else "torch"


def active_backend() -> str:
    return _active


def get(op: str, backend: str | None = None) -> Callable:
    impls = _TABLE[op]
    return impls.get(backend or _active) or impls["torch"]


def call(op: str, *args, **kwargs):
    """Run `op` on the active backend; with autograd on (training) always the reference."""
    impls = _TABLE[op]
    if torch.is_grad_enabled():
        return impls["torch"](*args, **kwargs)
    return (impls.get(_active) or impls["torch"])(*args, **kwargs)


def _out(out: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if out is None:
        return value
    out.copy_(value)
    return out


# ---------------------------------------------------------------- references


@register("rms_norm", "torch")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out=None) -> torch.Tensor:
    """x [T, d] -> [T, d]; fp32 statistics, cast back before the weight (as HF does)."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return _out(out, y)


@register("add_rms_norm", "torch")
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x (in place), returns (rms_norm(residual), residual)."""
    residual.add_(x)
    return rms_norm(residual, weight, eps), residual


@register("rope", "torch")
def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE. q [T, H, D], k [T, Hkv, D], positions int64 [T],
    cos/sin fp32 [max_pos, D/2]. Returns new (q, k) in the input dtype."""
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rot(q), rot(k)


@register("silu_mul", "torch")
def silu_mul(gate_up: torch.Tensor, out=None) -> torch.Tensor:
    """gate_up [T, 2F] -> silu(gate) * up, [T, F]."""
    g, u = gate_up.chunk(2, dim=-1)
    return _out(out, F.silu(g) * u)


@register("pack_linear", "torch")
def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """Backend-specific weight layout, made once at load time. weight [N, K]."""
    return weight


@register("linear", "torch")
def linear(x: torch.Tensor, weight: torch.Tensor, packed: object) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T -> [M, N]; `packed` is what pack_linear returned."""
    return F.linear(x, weight)


@register("write_kv", "torch")
def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """One layer: k_cache/v_cache [NB, BS, Hkv, D]; k, v [T, Hkv, D]; slots int64 [T]."""
    nb, bs, hk, d = k_cache.shape
    k_cache.view(nb * bs, hk, d).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(nb * bs, hk, d).index_copy_(0, slots, v.to(v_cache.dtype))


def gather_pages(cache: torch.Tensor, page_table: torch.Tensor, length: int) -> torch.Tensor:
    """One layer's cache [NB, BS, Hkv, D] -> the first `length` tokens of a sequence [length, Hkv, D]."""
    bs = cache.shape[1]
    n_pages = (length + bs - 1) // bs
    blocks = cache[page_table[:n_pages].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float):
    """q [T, H, D], k/v [S, Hkv, D], allowed bool [T, S] or None -> [T, H, D] (fp32 math)."""
    h, hk = q.shape[1], k.shape[1]
    kf = k.float().repeat_interleave(h // hk, dim=1)
    vf = v.float().repeat_interleave(h // hk, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), kf) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed.unsqueeze(0), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hts,shd->thd", probs, vf).to(q.dtype)


@register("paged_decode_attention", "torch")
def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out=None,
) -> torch.Tensor:
    """One query per sequence. q [B, H, D]; one layer's caches [NB, BS, Hkv, D];
    page_tables int32 [B, P]; context_lens int32 [B] (tokens in the cache, the query's
    own K/V already written). Returns [B, H, D]."""
    res = torch.empty_like(q) if out is None else out
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        k = gather_pages(k_cache, page_tables[b], n)
        v = gather_pages(v_cache, page_tables[b], n)
        res[b] = attend(q[b : b + 1], k, v, None, scale)[0]
    return res


def unpack_mask(mask_bits: torch.Tensor, n_cols: int) -> torch.Tensor:
    """int64 [T, W] bit mask (bit j%64 of word j//64 = row may see scratch row j) -> bool [T, n_cols]."""
    cols = torch.arange(n_cols, device=mask_bits.device)
    words = mask_bits[:, cols // 64]
    return ((words >> (cols % 64)) & 1).bool()


def pack_mask(allowed: torch.Tensor) -> torch.Tensor:
    """bool [T, S] -> int64 [T, ceil(S/64)] bit mask (inverse of unpack_mask)."""
    t, s = allowed.shape
    w = (s + 63) // 64
    padded = torch.zeros(t, w * 64, dtype=torch.int64, device=allowed.device)
    padded[:, :s] = allowed.long()
    shifts = torch.arange(64, device=allowed.device)
    return (padded.view(t, w, 64) << shifts).sum(-1)  # int64 wraps like uint64 bits


@register("tree_attention", "torch")
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
    """One sequence's new rows: q [T, H, D] see the whole paged prefix (prefix_len tokens,
    no mask) plus the step's scratch rows k_new/v_new [S, Hkv, D] where mask_bits
    (int64 [T, ceil(S/64)]) allows. Every row must see at least one key.
    Serves prefill (causal bits), decode and FIRP trees. Returns [T, H, D]."""
    kp = gather_pages(k_cache, page_table, prefix_len)
    vp = gather_pages(v_cache, page_table, prefix_len)
    k = torch.cat([kp.to(k_new.dtype), k_new])
    v = torch.cat([vp.to(v_new.dtype), v_new])
    allowed = torch.cat(
        [
            torch.ones(q.shape[0], prefix_len, dtype=torch.bool, device=q.device),
            unpack_mask(mask_bits, k_new.shape[0]),
        ],
        dim=1,
    )
    return _out(out, attend(q, k, v, allowed, scale))


@register("firp_project", "torch")
def firp_project(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """h [n, d], weight [k, d, d] (each map as nn.Linear: out x in), bias [k, d] or None
    -> pseudo rows [n * k, d], row j*k + i = weight[i] @ h[j] + bias[i]."""
    n, d = h.shape
    y = torch.einsum("nd,ked->nke", h.float(), weight.float())
    if bias is not None:
        y = y + bias.float()
    return _out(out, y.reshape(n * weight.shape[0], d).to(h.dtype))


@register("kv_commit", "torch")
def kv_commit(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scratch: torch.Tensor,
    v_scratch: torch.Tensor,
    src_rows: torch.Tensor,
    dst_slots: torch.Tensor,
) -> None:
    """All layers at once: k_cache/v_cache [L, NB, BS, Hkv, D]; k_scratch/v_scratch
    [L, S, Hkv, D]; row src_rows[i] of the scratch goes to slot dst_slots[i] (int64 [m])."""
    n_layers, nb, bs, hk, d = k_cache.shape
    kc = k_cache.view(n_layers, nb * bs, hk, d)
    vc = v_cache.view(n_layers, nb * bs, hk, d)
    kc[:, dst_slots] = k_scratch[:, src_rows].to(k_cache.dtype)
    vc[:, dst_slots] = v_scratch[:, src_rows].to(v_cache.dtype)
