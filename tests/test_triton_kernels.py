"""Triton kernels against the PyTorch references (ops.py), at shapes small enough for the
CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).

Outputs are poisoned with NaN and cache slots that no sequence owns hold NaN, so a
kernel that skips a write or reads a wrong slot fails loudly. The interpreter gets
bf16 arithmetic wrong, so it runs fp32 only; a GPU also runs bf16.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from firp_engine import ops
from firp_engine.backend import Backend
from firp_engine.errors import FirpError

try:
    with warnings.catch_warnings():  # the fallbacks warning (rope, silu_mul, GEMMs)
        warnings.simplefilter("ignore")
        TRITON = Backend.create("triton")
except FirpError as e:
    pytest.skip(str(e), allow_module_level=True)
import firp_kernels as K  # noqa: E402  (loaded by the backend module)

DEV = TRITON.device
DTYPES = [torch.float32] + ([torch.bfloat16] if DEV.type == "cuda" else [])
NAN = float("nan")


def tol(dtype: torch.dtype) -> dict:
    return dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def paged_cache(lens: list[int], bs: int, hk: int, d: int, dtype, spare: int = 3):
    """Caches [NB, BS, Hkv, D] whose slots outside the sequences' contexts hold NaN, and
    int32 page tables [B, P] in shuffled block order, padded with a NaN block."""
    pages = [(n + bs - 1) // bs for n in lens]
    nb = sum(pages) + spare
    order = torch.randperm(nb)
    kc = torch.full((nb, bs, hk, d), NAN, dtype=dtype)
    vc = torch.full((nb, bs, hk, d), NAN, dtype=dtype)
    table = torch.full((len(lens), max(pages) + 2), int(order[-1]), dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        blocks = order[used : used + pages[b]]
        used += pages[b]
        table[b, : pages[b]] = blocks.int()
        flat_k = kc[blocks].view(-1, hk, d)
        flat_v = vc[blocks].view(-1, hk, d)
        flat_k[:n] = torch.randn(n, hk, d, dtype=dtype)
        flat_v[:n] = torch.randn(n, hk, d, dtype=dtype)
        kc[blocks] = flat_k.view(-1, bs, hk, d)
        vc[blocks] = flat_v.view(-1, bs, hk, d)
    return kc.to(DEV), vc.to(DEV), table.to(DEV)


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, NAN)


# ---------------------------------------------------------------- paged decode attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "h,hk,d,lens,bs,splits",
    [
        (4, 4, 64, [1, 17, 50], 16, None),  # GQA 1, partly filled last pages
        (9, 3, 64, [5, 33], 16, None),  # GQA 3 (the default model)
        (8, 2, 64, [1, 70, 200], 16, 3),  # GQA 4, split-K: full, partial and empty splits
        (8, 1, 64, [48, 16], 8, 2),  # GQA 8, block size 8, one split past the end
        (8, 2, 128, [31, 95], 16, 2),  # head dim 128
    ],
)
def test_paged_decode_attention(h, hk, d, lens, bs, splits, dtype):
    kc, vc, table = paged_cache(lens, bs, hk, d, dtype)
    q = torch.randn(len(lens), h, d, dtype=dtype, device=DEV)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    ref = ops.paged_decode_attention(q, kc, vc, table, ctx, d**-0.5)
    out = nan_like(q)
    got = K.paged_decode_attention(q, kc, vc, table, ctx, d**-0.5, out, num_splits=splits)
    assert got is out
    torch.testing.assert_close(out, ref, **tol(dtype))


@pytest.mark.parametrize("tile", [32, 64])
def test_paged_decode_attention_key_tiles(monkeypatch, tile):
    # fp32 picks small key tiles; check the GPU's bf16 tile sizes here too.
    monkeypatch.setattr(sys.modules["firp_kernels.paged_decode_attention"], "key_tile", lambda *_: tile)
    kc, vc, table = paged_cache([90, 3], 16, 2, 128, torch.float32)
    q = torch.randn(2, 6, 128, device=DEV)
    ctx = torch.tensor([90, 3], dtype=torch.int32, device=DEV)
    ref = ops.paged_decode_attention(q, kc, vc, table, ctx, 0.1)
    torch.testing.assert_close(K.paged_decode_attention(q, kc, vc, table, ctx, 0.1, num_splits=2), ref)


def test_paged_decode_attention_registered_op():
    kc, vc, table = paged_cache([300, 7], 16, 3, 64, torch.float32)
    q = torch.randn(2, 9, 64, device=DEV)
    ctx = torch.tensor([300, 7], dtype=torch.int32, device=DEV)
    ref = ops.paged_decode_attention(q, kc, vc, table, ctx, 0.125)
    torch.testing.assert_close(TRITON.op("paged_decode_attention")(q, kc, vc, table, ctx, 0.125), ref)


# ---------------------------------------------------------------- tree attention


def random_mask(t: int, s: int, prefix_len: int) -> torch.Tensor:
    """int64 bit mask [T, ceil(S/64)] with random bits; with no prefix each row sees one key.
    Bits past S in the last word are set, to check that the kernel ignores them."""
    allowed = torch.rand(t, s) < 0.5
    if prefix_len == 0:
        allowed[torch.arange(t), torch.arange(t) % s] = True
    bits = ops.pack_mask(allowed)
    if s % 64:
        junk = ~((1 << (s % 64)) - 1) & (2**64 - 1)
        bits[:, -1] |= junk - 2**64 if junk >= 2**63 else junk
    return bits.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "t,s,prefix,h,hk,d,splits",
    [
        (1, 1, 37, 9, 3, 64, None),  # plain decode through the tree kernel
        (7, 7, 37, 9, 3, 64, None),  # small tree, GQA 3, partly filled last page
        (4, 64, 20, 4, 4, 64, None),  # a full mask word, GQA 1
        (5, 100, 50, 8, 2, 64, None),  # two mask words (S > 64), GQA 4
        (6, 12, 150, 8, 1, 64, 3),  # GQA 8, prefix split into 3 parts
        (3, 5, 70, 8, 2, 128, 2),  # head dim 128, prefix split
        (20, 20, 0, 9, 3, 64, None),  # prefill: no prefix, random bits + diagonal
        (2, 0, 45, 4, 2, 64, 2),  # no scratch rows, prefix only
    ],
)
def test_tree_attention(t, s, prefix, h, hk, d, splits, dtype):
    kc, vc, table = paged_cache([prefix], 16, hk, d, dtype)
    q = torch.randn(t, h, d, dtype=dtype, device=DEV)
    k_new = torch.randn(s, hk, d, dtype=dtype, device=DEV)
    v_new = torch.randn(s, hk, d, dtype=dtype, device=DEV)
    bits = random_mask(t, s, prefix) if s else torch.zeros(t, 0, dtype=torch.int64, device=DEV)
    ref = ops.tree_attention(q, kc, vc, table[0], prefix, k_new, v_new, bits, d**-0.5)
    out = nan_like(q)
    got = K.tree_attention(q, kc, vc, table[0], prefix, k_new, v_new, bits, d**-0.5, out, num_splits=splits)
    assert got is out
    torch.testing.assert_close(out, ref, **tol(dtype))


@pytest.mark.parametrize("tiles", [(16, 64), (64, 32), (32, 16)])
def test_tree_attention_tile_sizes(monkeypatch, tiles):
    # fp32 picks small tiles; check the GPU's bf16 tile sizes (a key tile = a whole mask word) too.
    monkeypatch.setattr(sys.modules["firp_kernels.tree_attention"], "tile_sizes", lambda *_: tiles)
    t, s, prefix, h, hk, d = 9, 70, 40, 6, 2, 64
    kc, vc, table = paged_cache([prefix], 16, hk, d, torch.float32)
    q = torch.randn(t, h, d, device=DEV)
    k_new, v_new = torch.randn(2, s, hk, d, device=DEV)
    bits = random_mask(t, s, prefix)
    ref = ops.tree_attention(q, kc, vc, table[0], prefix, k_new, v_new, bits, 0.125)
    got = K.tree_attention(q, kc, vc, table[0], prefix, k_new, v_new, bits, 0.125, num_splits=2)
    torch.testing.assert_close(got, ref)


def test_tree_attention_causal_prefill_registered_op():
    t, hk, d = 70, 1, 64
    kc, vc, table = paged_cache([0], 16, hk, d, torch.float32)
    q = torch.randn(t, 3, d, device=DEV)
    k_new, v_new = torch.randn(2, t, hk, d, device=DEV)
    bits = ops.pack_mask(torch.ones(t, t, dtype=torch.bool).tril()).to(DEV)
    ref = ops.tree_attention(q, kc, vc, table[0], 0, k_new, v_new, bits, 0.125)
    got = TRITON.op("tree_attention")(q, kc, vc, table[0], 0, k_new, v_new, bits, 0.125)
    torch.testing.assert_close(got, ref)


# ---------------------------------------------------------------- FIRP projection


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,d,bias", [(1, 1, 64, False), (5, 3, 48, True), (19, 2, 64, True)])
def test_firp_project(n, k, d, bias, dtype):
    h = torch.randn(n, d, dtype=dtype, device=DEV)
    w = torch.randn(k, d, d, dtype=dtype, device=DEV) / d**0.5
    b = torch.randn(k, d, dtype=dtype, device=DEV) if bias else None
    ref = ops.firp_project(h, w, b)
    out = torch.full((n * k, d), NAN, dtype=dtype, device=DEV)
    assert K.firp_project(h, w, b, out) is out
    torch.testing.assert_close(out, ref, **tol(dtype))
    torch.testing.assert_close(K.firp_project(h, w, b), ref, **tol(dtype))


# ---------------------------------------------------------------- cache writes


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_strided_input(dtype):
    nb, bs, hk, d, t = 6, 16, 3, 64, 5
    kc = torch.randn(nb, bs, hk, d, dtype=dtype, device=DEV)
    vc = torch.randn(nb, bs, hk, d, dtype=dtype, device=DEV)
    qkv = torch.randn(t, (9 + 2 * hk) * d, dtype=dtype, device=DEV)
    k = qkv[:, 9 * d : (9 + hk) * d].view(t, hk, d)  # strided views, as the model makes them
    v = qkv[:, (9 + hk) * d :].view(t, hk, d)
    slots = torch.tensor([0, 17, 31, 32, 95], device=DEV)
    rk, rv = kc.clone(), vc.clone()
    ops.write_kv(rk, rv, k, v, slots)
    K.write_kv(kc, vc, k, v, slots)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_commit_all_layers(dtype):
    n_layers, nb, bs, hk, d, s = 3, 5, 16, 3, 64, 9
    kc = torch.randn(n_layers, nb, bs, hk, d, dtype=dtype, device=DEV)
    vc = torch.randn(n_layers, nb, bs, hk, d, dtype=dtype, device=DEV)
    ks = torch.randn(n_layers, s, hk, d, dtype=dtype, device=DEV)
    vs = torch.randn(n_layers, s, hk, d, dtype=dtype, device=DEV)
    src = torch.tensor([0, 3, 4, 8], device=DEV)
    dst = torch.tensor([40, 41, 42, 79], device=DEV)
    rk, rv = kc.clone(), vc.clone()
    ops.kv_commit(rk, rv, ks, vs, src, dst)
    K.kv_commit(kc, vc, ks, vs, src, dst)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,d", [(1, 64), (5, 576)])
def test_rms_norm(t, d, dtype):
    x = torch.randn(t, d, dtype=dtype, device=DEV)
    w = torch.randn(d, dtype=dtype, device=DEV)
    ref = ops.rms_norm(x, w, 1e-5)
    out = nan_like(x)
    assert K.rms_norm(x, w, 1e-5, out=out) is out
    torch.testing.assert_close(out, ref, **tol(dtype))
    torch.testing.assert_close(K.rms_norm(x, w, 1e-5), ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype):
    x = torch.randn(4, 576, dtype=dtype, device=DEV)
    res = torch.randn(4, 576, dtype=dtype, device=DEV)
    w = torch.randn(576, dtype=dtype, device=DEV)
    ref_res = res.clone()
    ref_y, _ = ops.add_rms_norm(x, ref_res, w, 1e-6)
    y, got_res = K.add_rms_norm(x, res, w, 1e-6)
    assert got_res is res
    torch.testing.assert_close(res, ref_res, **tol(dtype))
    torch.testing.assert_close(y, ref_y, **tol(dtype))


# ---------------------------------------------------------------- registration


def test_registered_kernels():
    """The registered attention ops are thin wrappers over firp_kernels (the others are its
    functions themselves); the argument lists are checked in test_ops.py."""
    names = set(ops.KERNELS["triton"])
    assert names == {"rms_norm", "add_rms_norm", "write_kv", "kv_commit", "firp_project"} | {
        "paged_decode_attention",
        "tree_attention",
    }
    assert set(TRITON.fallbacks) == {"rope", "silu_mul", "pack_linear", "linear", "top_lse"}
    for op in ("rms_norm", "add_rms_norm", "write_kv", "kv_commit", "firp_project"):
        assert TRITON.op(op) is getattr(K, op)
