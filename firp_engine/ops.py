"""The ops: a PyTorch reference for each, and the table of kernels that backends register.

Every op has its reference here: it runs on any device, and it is what training runs (its
torch ops have gradients). A backend module (`firp_engine/backends/<name>.py`: `cpu` = our
C++ in `csrc/cpu`, `triton` = `kernels/`, `cuda` = `csrc/cuda`) registers its kernels into
`KERNELS[name]` when imported. Nothing here chooses between them: a `Backend` object
(`firp_engine/backend.py`) decides once, per model, which implementation runs each op.

Shapes used throughout (one layer's cache is `k_cache[l]`):
    k_cache, v_cache   [L, num_blocks, block_size, n_kv_heads, head_dim]
    page table         int32 [max_pages] (one sequence) or [B, max_pages]
    slot               block_id * block_size + offset, int64
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from firp_engine import quant

# op -> its PyTorch reference; backend name -> op -> that backend's kernel.
REFERENCES: dict[str, Callable] = {}
KERNELS: dict[str, dict[str, Callable]] = {}


def reference(fn: Callable) -> Callable:
    """Declare fn as the reference of the op of its name."""
    REFERENCES[fn.__name__] = fn
    return fn


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Declare fn as `backend`'s kernel for `op` (it takes the reference's exact arguments)."""
    if op not in REFERENCES:
        raise KeyError(f"no op named {op!r}")

    def deco(fn: Callable) -> Callable:
        KERNELS.setdefault(backend, {})[op] = fn
        return fn

    return deco


def _out(out: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if out is None:
        return value
    out.copy_(value)
    return out


# ---------------------------------------------------------------- references


@reference
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out=None) -> torch.Tensor:
    """x [T, d] -> [T, d]; fp32 statistics, cast back before the weight (as HF does)."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return _out(out, y)


@reference
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x (in place), returns (rms_norm(residual), residual)."""
    residual.add_(x)
    return rms_norm(residual, weight, eps), residual


@reference
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


@reference
def silu_mul(gate_up: torch.Tensor, out=None) -> torch.Tensor:
    """gate_up [T, 2F] -> silu(gate) * up, [T, F]."""
    g, u = gate_up.chunk(2, dim=-1)
    return _out(out, F.silu(g) * u)


@reference
def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """Backend-specific weight layout, made once at load time. weight [N, K]."""
    return weight


@reference
def linear(x: torch.Tensor, weight: torch.Tensor, packed: object) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T -> [M, N]; `packed` is what pack_linear returned. A
    QuantWeight (GGUF blocks): the native kernel's definition for its act (firp_engine/quant.py:
    x quantized per row to 8-bit blocks, or x @ the dequantized weights)."""
    if isinstance(weight, quant.QuantWeight):
        return quant.reference_linear(x, weight)
    return F.linear(x, weight)


@reference
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


@reference
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


@reference
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


@reference
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


@reference
def top_lse(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 x [R, V] -> (the k largest values [R, k], largest first; their int64 indices
    [R, k]; logsumexp [R]): a drafter's candidates and their softmax probabilities."""
    top = torch.topk(x, k, dim=-1)
    return top.values, top.indices, torch.logsumexp(x, -1)


@reference
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
