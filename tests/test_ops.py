"""Every kernel of every available backend against the PyTorch reference (firp_engine/ops.py).

Each test takes the kernel from a `Backend` object and asserts that it is the backend's own
registered kernel (an op the backend lacks is skipped, by name, as `Backend.fallbacks` lists
it); kernels raise on an input they do not run, so no test here can end up comparing the
reference with itself. Fresh random inputs, outputs poisoned with NaN (`out=` prefilled where
the op takes it), cache slots that no sequence owns hold NaN (a kernel that reads a wrong
slot fails), and in-place cache writes must leave every other slot bit-identical. Backends
cuda/triton run on the GPU when there is one; without one, triton runs under its CPU
interpreter (TRITON_INTERPRET=1, see conftest.py), which is slow and wrong in bf16: it gets
the small cases in fp32 only.
"""

from __future__ import annotations

import ast
import inspect
import warnings

import pytest
import torch

from firp_engine import ops
from firp_engine.backend import Backend, available_backends

NAN = float("nan")
with warnings.catch_warnings():  # triton's fallbacks warning: read from `fallbacks` below
    warnings.simplefilter("ignore")
    CHOSEN = {name: Backend.create(name) for name in available_backends() if name != "torch"}
# cpu@<path> for every SIMD path this machine runs, less the one `cpu` runs (the same kernels)
if "cpu" in CHOSEN:
    CHOSEN.pop(f"cpu@{CHOSEN['cpu'].isa}", None)
BACKENDS = list(CHOSEN)
F32, BF16 = torch.float32, torch.bfloat16
DTYPES = [F32, BF16]
# (H, Hkv, D): GQA ratios 3, 1, 4, 8 and head dims 64, 128
HEADS = [(9, 3, 64), (4, 4, 128), (8, 2, 128), (16, 2, 64)]

if not BACKENDS:
    pytest.skip("no backend besides torch is available (build firp_engine._C)", allow_module_level=True)


def device_of(backend: str) -> torch.device:
    return CHOSEN[backend].device


def interpreted(backend: str) -> bool:
    return backend == "triton" and CHOSEN[backend].device.type == "cpu"


def impl(op: str, backend: str, dtype: torch.dtype, big: bool = False):
    """The backend's own kernel for op, or skip (not implemented there / too slow to interpret)."""
    chosen = CHOSEN[backend]
    if op in chosen.fallbacks:
        pytest.skip(f"{backend} has no {op} kernel")
    if interpreted(backend) and (dtype == BF16 or big):
        pytest.skip("the triton interpreter runs small fp32 cases only")
    fn = chosen.op(op)
    assert fn is ops.KERNELS[backend][op] and fn is not ops.REFERENCES[op]
    return fn


def tol(dtype: torch.dtype) -> dict:
    return dict(atol=1e-4, rtol=1e-4) if dtype == F32 else dict(atol=2e-2, rtol=2e-2)


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), **tol(dtype))


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, NAN)


def bits(x: torch.Tensor) -> torch.Tensor:
    """Raw bits, so that NaN == NaN when comparing caches."""
    return x.cpu().view(torch.int16 if x.element_size() == 2 else torch.int32)


def randn(*shape: int, dtype: torch.dtype, dev: str) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32).to(dtype).to(dev)


# ---------------------------------------------------------------- norms, rope, swiglu


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 576), (7, 33), (64, 128)])
def test_rms_norm(backend, dtype, rows, d):
    fn = impl("rms_norm", backend, dtype)
    dev = device_of(backend)
    x, w = randn(rows, d, dtype=dtype, dev=dev), randn(d, dtype=dtype, dev=dev)
    out = nan_like(x)
    res = fn(x, w, 1e-5, out=out)
    assert res is out
    check(out, ops.rms_norm(x, w, 1e-5), dtype)
    check(fn(x, w, 1e-6), ops.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 576), (5, 33), (64, 128)])
def test_add_rms_norm(backend, dtype, rows, d):
    fn = impl("add_rms_norm", backend, dtype)
    dev = device_of(backend)
    x, w = randn(rows, d, dtype=dtype, dev=dev), randn(d, dtype=dtype, dev=dev)
    residual = randn(rows, d, dtype=dtype, dev=dev)
    ref_residual = residual.clone()
    y, r = fn(x, residual, w, 1e-5)
    y_ref, r_ref = ops.add_rms_norm(x, ref_residual, w, 1e-5)
    assert r is residual  # updated in place and returned
    check(r, r_ref, dtype)
    check(y, y_ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize("heads", HEADS[:3])
def test_rope(backend, dtype, tokens, heads):
    fn = impl("rope", backend, dtype, big=tokens > 5)
    dev = device_of(backend)
    h, hk, d = heads
    # q and k as views into one qkv projection output: strided rows
    qkv = randn(tokens, h + 2 * hk, d, dtype=dtype, dev=dev)
    q, k = qkv[:, :h], qkv[:, h : h + hk]
    pos = torch.randint(0, 300, (tokens,), device=dev)
    ang = torch.arange(300, dtype=F32, device=dev)[:, None] * torch.rand(d // 2, device=dev)[None]
    cos, sin = ang.cos(), ang.sin()
    q_out, k_out = fn(q, k, pos, cos, sin)
    q_ref, k_ref = ops.rope(q, k, pos, cos, sin)
    check(q_out, q_ref, dtype)
    check(k_out, k_ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,f", [(1, 1536), (5, 37), (64, 256)])
def test_silu_mul(backend, dtype, rows, f):
    fn = impl("silu_mul", backend, dtype)
    dev = device_of(backend)
    gu = randn(rows, 2 * f, dtype=dtype, dev=dev) * 3
    out = torch.full((rows, f), NAN, dtype=dtype, device=dev)
    assert fn(gu, out=out) is out
    check(out, ops.silu_mul(gu), dtype)
    check(fn(gu), ops.silu_mul(gu), dtype)


# ---------------------------------------------------------------- small-M matmul


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 64])
@pytest.mark.parametrize("n,k", [(576, 576), (17, 33), (100, 1537), (1000, 64)])
def test_linear(backend, dtype, m, n, k):
    pack = impl("pack_linear", backend, dtype, big=True)
    lin = impl("linear", backend, dtype, big=True)
    dev = device_of(backend)
    w = randn(n, k, dtype=dtype, dev=dev) / k**0.5
    x = randn(m, k, dtype=dtype, dev=dev)
    packed = pack(w)
    ref = torch.nn.functional.linear(x.float(), w.float()).to(dtype)  # fp32 accumulation
    check(lin(x, w, packed), ref, dtype)
    if m == 3:  # rows with a stride (a view into a wider activation)
        xs = randn(m, k + 5, dtype=dtype, dev=dev)[:, 5:]
        check(lin(xs, w, packed), torch.nn.functional.linear(xs.float(), w.float()).to(dtype), dtype)


# ---------------------------------------------------------------- KV cache writes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_dtype,kv_dtype", [(F32, F32), (BF16, BF16), (BF16, F32)])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_write_kv(backend, cache_dtype, kv_dtype, tokens):
    fn = impl("write_kv", backend, BF16 if BF16 in (cache_dtype, kv_dtype) else F32)
    dev = device_of(backend)
    nb, bs, hk, d = 10, 16, 3, 64
    kc = randn(nb, bs, hk, d, dtype=cache_dtype, dev=dev)
    kc.view(-1)[::7] = NAN  # poisoned slots must survive bit for bit
    vc = kc.clone() * 2
    qkv = randn(tokens, 9 + 2 * hk, d, dtype=kv_dtype, dev=dev)  # k and v as strided views
    k, v = qkv[:, 9 : 9 + hk], qkv[:, 9 + hk :]
    slots = torch.randperm(nb * bs, device=dev)[:tokens]
    kc_ref, vc_ref = kc.clone(), vc.clone()
    fn(kc, vc, k, v, slots)
    ops.write_kv(kc_ref, vc_ref, k, v, slots)
    assert torch.equal(bits(kc), bits(kc_ref))
    assert torch.equal(bits(vc), bits(vc_ref))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_dtype,kv_dtype", [(F32, F32), (BF16, BF16), (BF16, F32)])
@pytest.mark.parametrize("m", [1, 5])
def test_kv_commit(backend, cache_dtype, kv_dtype, m):
    fn = impl("kv_commit", backend, BF16 if BF16 in (cache_dtype, kv_dtype) else F32)
    dev = device_of(backend)
    layers, nb, bs, hk, d, s = 3, 6, 8, 2, 64, 20
    kc = torch.full((layers, nb, bs, hk, d), NAN, dtype=cache_dtype, device=dev)
    kc.view(-1)[::3] = 1.5
    vc = kc.clone()
    ks, vs = (
        randn(layers, s, hk, d, dtype=kv_dtype, dev=dev),
        randn(layers, s, hk, d, dtype=kv_dtype, dev=dev),
    )
    src = torch.randperm(s, device=dev)[:m]
    dst = torch.randperm(nb * bs, device=dev)[:m]
    kc_ref, vc_ref = kc.clone(), vc.clone()
    fn(kc, vc, ks, vs, src, dst)
    ops.kv_commit(kc_ref, vc_ref, ks, vs, src, dst)
    assert torch.equal(bits(kc), bits(kc_ref))
    assert torch.equal(bits(vc), bits(vc_ref))


# ---------------------------------------------------------------- attention


def paged_cache(lens: list[int], bs: int, hk: int, d: int, dtype: torch.dtype, dev: str):
    """Caches [NB, BS, Hkv, D] with random K/V in the sequences' slots and NaN everywhere
    else, and int32 page tables [B, P] in shuffled block order (unused entries point at a
    spare NaN block)."""
    pages = [(n + bs - 1) // bs for n in lens]
    nb = sum(pages) + 2
    order = torch.randperm(nb)
    kc = torch.full((nb * bs, hk, d), NAN, dtype=dtype)
    vc = torch.full((nb * bs, hk, d), NAN, dtype=dtype)
    table = torch.full((len(lens), max(pages) + 1), int(order[-1]), dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        blocks = order[used : used + pages[b]]
        used += pages[b]
        table[b, : pages[b]] = blocks.int()
        slots = (blocks[:, None] * bs + torch.arange(bs)).reshape(-1)[:n]
        kc[slots] = torch.randn(n, hk, d).to(dtype)
        vc[slots] = torch.randn(n, hk, d).to(dtype)
    shape = (nb, bs, hk, d)
    return kc.view(shape).to(dev), vc.view(shape).to(dev), table.to(dev)


DECODE_CASES = [  # (context lengths, block size): partly filled last pages, long contexts
    ([1, 17, 40], 16),
    ([5], 8),
    ([1000], 16),
    ([300, 1, 129, 64], 16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("lens,bs", DECODE_CASES)
def test_paged_decode_attention(backend, dtype, heads, lens, bs):
    fn = impl("paged_decode_attention", backend, dtype, big=max(lens) >= 1000)
    dev = device_of(backend)
    h, hk, d = heads
    kc, vc, table = paged_cache(lens, bs, hk, d, dtype, dev)
    q = randn(len(lens), h, d, dtype=dtype, dev=dev)
    clens = torch.tensor(lens, dtype=torch.int32, device=dev)
    out = nan_like(q)
    assert fn(q, kc, vc, table, clens, d**-0.5, out=out) is out
    check(out, ops.paged_decode_attention(q, kc, vc, table, clens, d**-0.5), dtype)


TREE_CASES = [  # (query rows T, scratch rows S, prefix length, block size)
    (1, 1, 37, 16),
    (16, 64, 300, 16),
    (64, 64, 1000, 16),
    (5, 100, 0, 16),  # > 64 scratch rows: two mask words; no prefix (a prefill)
    (9, 130, 20, 8),  # three mask words
    (24, 24, 320, 16),  # 72 rows a kv head: blocks of whole row vectors, two splits
]


def tree_mask(t: int, s: int, dev: str) -> torch.Tensor:
    """Random visibility with row i always seeing scratch row i % S (every row sees a key)."""
    allowed = torch.rand(t, s) < 0.5
    allowed[torch.arange(t), torch.arange(t) % s] = True
    return ops.pack_mask(allowed).to(dev)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("t,s,prefix,bs", TREE_CASES)
def test_tree_attention(backend, dtype, heads, t, s, prefix, bs):
    fn = impl("tree_attention", backend, dtype, big=t * s >= 1024 or prefix >= 300)
    dev = device_of(backend)
    h, hk, d = heads
    kc, vc, table = paged_cache([max(prefix, 1)], bs, hk, d, dtype, dev)
    q = randn(t, h, d, dtype=dtype, dev=dev)
    k_new, v_new = randn(s, hk, d, dtype=dtype, dev=dev), randn(s, hk, d, dtype=dtype, dev=dev)
    mask = tree_mask(t, s, dev)
    out = nan_like(q)
    args = (q, kc, vc, table[0], prefix, k_new, v_new, mask, d**-0.5)
    assert fn(*args, out=out) is out
    check(out, ops.tree_attention(*args), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_attention_fp32_scratch_on_bf16_cache(backend):
    """The scratch rows may be kept in fp32 while the cache is bf16."""
    fn = impl("tree_attention", backend, BF16)
    dev = device_of(backend)
    h, hk, d = HEADS[0]
    kc, vc, table = paged_cache([70], 16, hk, d, BF16, dev)
    q = randn(6, h, d, dtype=F32, dev=dev)
    k_new, v_new = randn(6, hk, d, dtype=F32, dev=dev), randn(6, hk, d, dtype=F32, dev=dev)
    args = (q, kc, vc, table[0], 70, k_new, v_new, tree_mask(6, 6, dev), d**-0.5)
    if backend == "cuda":  # its kernels take one dtype for q, caches and new rows
        with pytest.raises(RuntimeError, match="share a dtype"):
            fn(*args)
        return
    check(fn(*args), ops.tree_attention(*args), BF16)


# Head dims the attention kernels are not built for: they must raise, not run the reference.
REFUSED_HEAD_DIM = {"cpu": 12, "cuda": 96}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in REFUSED_HEAD_DIM])
def test_attention_refuses_unbuilt_head_dim(backend):
    dev, d = device_of(backend), REFUSED_HEAD_DIM[backend]
    kc, vc, table = paged_cache([20], 16, 2, d, F32, dev)
    q = randn(1, 4, d, dtype=F32, dev=dev)
    lens = torch.tensor([20], dtype=torch.int32, device=dev)
    with pytest.raises(RuntimeError, match="head_dim"):
        impl("paged_decode_attention", backend, F32)(q, kc, vc, table, lens, 0.1)
    k_new = randn(1, 2, d, dtype=F32, dev=dev)
    with pytest.raises(RuntimeError, match="head_dim"):
        impl("tree_attention", backend, F32)(q, kc, vc, table[0], 20, k_new, k_new, tree_mask(1, 1, dev), 0.1)


# ---------------------------------------------------------------- FIRP projection


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,d", [(1, 3, 64), (16, 3, 576), (7, 2, 130)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_firp_project(backend, dtype, n, k, d, with_bias):
    fn = impl("firp_project", backend, dtype)
    dev = device_of(backend)
    h = randn(n, d, dtype=dtype, dev=dev)
    w = randn(k, d, d, dtype=dtype, dev=dev) / d**0.5
    bias = randn(k, d, dtype=dtype, dev=dev) if with_bias else None
    out = torch.full((n * k, d), NAN, dtype=dtype, device=dev)
    if backend == "cuda" and d % 8:  # its kernel reads rows in 16-byte packs
        with pytest.raises(RuntimeError, match="multiple of 8"):
            fn(h, w, bias, out=out)
        return
    assert fn(h, w, bias, out=out) is out
    check(out, ops.firp_project(h, w, bias), dtype)


# ---------------------------------------------------------------- drafting


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "rows,vocab,k", [(1, 49152, 8), (3, 1000, 1), (5, 97, 97), (2, 63, 10), (4, 5000, 64)]
)
def test_top_lse(backend, rows, vocab, k):
    fn = impl("top_lse", backend, F32, big=vocab > 10000)
    x = torch.randn(rows, vocab, device=device_of(backend)) * 4
    x[0, -1] = 30.0  # a maximum in the last, partial block
    vals, idx, lse = fn(x, k)
    want_v, want_i, want_lse = ops.top_lse(x, k)
    assert torch.equal(idx, want_i) and torch.equal(vals, want_v)  # distinct values: one answer
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_lse_ties_and_edges(backend):
    fn = impl("top_lse", backend, F32)
    dev = device_of(backend)
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [-float("inf")] * 5], device=dev)
    vals, idx, lse = fn(x, 3)
    assert idx[0].tolist() == [1, 2, 4] and vals[0].tolist() == [3.0, 3.0, 3.0]  # ties: lower index first
    assert lse[1].item() == -float("inf")
    torch.testing.assert_close(lse[0], torch.logsumexp(x[0], -1))
    with pytest.raises(RuntimeError):
        fn(x, 6)


# ---------------------------------------------------------------- registration


def parameters(fn) -> list[tuple[str, object, object]]:
    """(name, kind, default) of each parameter; a pybind11 function's from its docstring
    ("name(x: torch.Tensor, out: torch.Tensor | None = None) -> ..."), whose parameters all
    take keywords."""
    try:
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
    except ValueError:
        head = fn.__doc__.split(") -> ", 1)[0]
        out = []
        for part in head[head.index("(") + 1 :].split(", "):
            name, _, default = part.partition(" = ")
            value = ast.literal_eval(default) if default else inspect.Parameter.empty
            out.append((name.split(":")[0], inspect.Parameter.POSITIONAL_OR_KEYWORD, value))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_kernel_takes_the_reference_arguments(backend):
    """Callers pass arguments by the reference's names (e.g. out=): every kernel takes them."""
    kernels = ops.KERNELS[backend]
    assert kernels and set(kernels) | set(CHOSEN[backend].fallbacks) == set(ops.REFERENCES)
    for op, fn in kernels.items():
        assert parameters(fn) == parameters(ops.REFERENCES[op]), op
