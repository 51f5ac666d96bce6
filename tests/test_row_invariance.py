"""Row invariance of the cpu backend's kernels (issue 11; the rule is in csrc/cpu/README.md).

A row's result must be bit-identical whether the row is computed alone or inside a call with
any number of other rows, at any place in that call, and under any thread count. Row-wise
ops: a pool of fresh random rows, each computed alone, then calls of M = 2 .. 65 rows drawn
from the pool in random order must give exactly the stacked single-row results. Attention:
a query row's output must depend only on the keys it sees, in order, whatever path reads
them: plain decoding (its context committed to the cache), a draft tree step (prefix in the
cache, its ancestors in the scratch rows, siblings masked), a prefill chunk (causal bits),
and a row of a random mask versus the same row alone with only its visible rows. Outputs are
poisoned with NaN first; comparisons are on raw bits.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("firp_engine._C", reason="the cpu backend's extension is not built")

from firp_engine import ops  # noqa: E402
from firp_engine.backend import Backend, available_backends  # noqa: E402

# The path the cpu backend runs here and the portable one (the rule holds per path: paths may
# round differently). Forced lower paths are checked against the reference by test_ops.py only,
# to keep the default test run short on machines with four paths.
CPU_NAMES = sorted({f"cpu@{Backend.create('cpu').isa}", "cpu@scalar"} & set(available_backends()))
CPU = Backend.create("cpu")
F32, BF16 = torch.float32, torch.bfloat16
DTYPES = [F32, BF16]
NAN = float("nan")
M_VALUES = [2, 3, 4, 5, 7, 8, 13, 16, 31, 33, 64, 65]
THREADS = [1, 2]
# (H, Hkv, D): GQA groups of 3 (the default model), 1, 4 and 8 (> a register tile of rows)
HEADS = [(9, 3, 64), (4, 4, 128), (8, 2, 128), (16, 2, 64)]
PREFIXES = [0, 1, 31, 33, 255, 257, 600]  # around the kernels' blocks (32) and splits (256)


@pytest.fixture(autouse=True, scope="module", params=CPU_NAMES)
def cpu_path(request):
    """Runs the module once per SIMD path: `op` reads the backend set here."""
    global CPU
    CPU = Backend.create(request.param)
    yield request.param


def op(name: str):
    fn = CPU.op(name)
    assert fn is ops.KERNELS[CPU.name][name], f"{CPU.name} runs no kernel for {name}"
    return fn


def rand(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of raw bits (NaN == NaN, and -0.0 != 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


@pytest.fixture(params=THREADS, ids=lambda n: f"threads{n}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def check_rowwise(run, pool: list[torch.Tensor], seed: int) -> None:
    """run(rows [M, ...]) -> [M, ...]: each call of M pool rows in random order must give the
    rows' single-row results, bit for bit."""
    alone = [run(x.unsqueeze(0))[0] for x in pool]
    rng = random.Random(seed)
    for m in M_VALUES:
        pick = [rng.randrange(len(pool)) for _ in range(m)]
        out = run(torch.stack([pool[i] for i in pick]))
        for place, i in enumerate(pick):
            assert same_bits(out[place], alone[i]), f"M={m}: row {i} at place {place} differs from alone"


# ---------------------------------------------------------------- GEMM and row-wise ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(1, 1), (37, 53), (960, 576), (576, 1536), (100, 1027), (3000, 64)])
def test_linear(dtype, n, k, threads):
    w = rand(n, k, dtype=dtype)
    packed = op("pack_linear")(w)
    pool = [rand(k, dtype=dtype) for _ in range(24)]
    check_rowwise(lambda x: op("linear")(x, w, packed), pool, seed=n * k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [7, 64, 576, 1000])
def test_rms_norm(dtype, d, threads):
    w = rand(d, dtype=dtype)
    pool = [rand(d, dtype=dtype) for _ in range(16)]
    check_rowwise(lambda x: op("rms_norm")(x, w, 1e-5, out=torch.full_like(x, NAN)), pool, seed=d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [7, 576, 1000])
def test_add_rms_norm(dtype, d, threads):
    w = rand(d, dtype=dtype)
    pool = [rand(2, d, dtype=dtype) for _ in range(16)]  # (x, residual) per row

    def run(rows: torch.Tensor) -> torch.Tensor:
        residual = rows[:, 1].clone()
        y, res = op("add_rms_norm")(rows[:, 0].contiguous(), residual, w, 1e-5)
        return torch.stack([y, res], dim=1)

    check_rowwise(run, pool, seed=d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hk,d", [(9, 3, 64), (4, 2, 128), (3, 1, 18)])
def test_rope(dtype, h, hk, d, threads):
    max_pos = 4096
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.arange(max_pos).float()[:, None] * inv
    cos, sin = angles.cos(), angles.sin()
    positions = torch.randint(0, max_pos, (16, 1)).float()
    pool = list(torch.cat([rand(16, (h + hk) * d, dtype=F32), positions], dim=1))  # q, k, position per row

    def run(rows: torch.Tensor) -> torch.Tensor:
        t = rows.shape[0]
        q = rows[:, : h * d].reshape(t, h, d).to(dtype)
        k = rows[:, h * d : (h + hk) * d].reshape(t, hk, d).to(dtype)
        qo, ko = op("rope")(q, k, rows[:, -1].long(), cos, sin)
        return torch.cat([qo.reshape(t, -1), ko.reshape(t, -1)], dim=1)

    check_rowwise(run, pool, seed=d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("f", [5, 64, 1536, 1001])
def test_silu_mul(dtype, f, threads):
    pool = [rand(2 * f, dtype=dtype) for _ in range(16)]
    check_rowwise(
        lambda x: op("silu_mul")(x, out=torch.full((x.shape[0], f), NAN, dtype=dtype)), pool, seed=f
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,d,bias", [(3, 64, True), (2, 37, False), (4, 576, True)])
def test_firp_project(dtype, k, d, bias, threads):
    w = rand(k, d, d, dtype=dtype)
    b = rand(k, d, dtype=dtype) if bias else None
    pool = [rand(d, dtype=dtype) for _ in range(12)]

    def run(h: torch.Tensor) -> torch.Tensor:
        out = torch.full((h.shape[0] * k, d), NAN, dtype=dtype)
        return op("firp_project")(h, w, b, out=out).reshape(h.shape[0], k, d)

    check_rowwise(run, pool, seed=k * d)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_and_commit_copy_the_bits(dtype, threads):
    """The K/V of a row reaches its slot as the same bits, alone or with others, by write_kv
    (a one-row step) or by kv_commit from a tree's scratch rows."""
    nb, bs, hk, d, layers = 8, 16, 3, 64, 2
    k, v = rand(layers, 40, hk, d, dtype=dtype), rand(layers, 40, hk, d, dtype=dtype)
    slots = torch.randperm(nb * bs)[:40]
    one = [torch.full((layers, nb, bs, hk, d), NAN, dtype=dtype) for _ in "kv"]
    for i in range(40):
        for layer in range(layers):
            rows = slice(i, i + 1)
            op("write_kv")(one[0][layer], one[1][layer], k[layer, rows], v[layer, rows], slots[rows])
    batched = [torch.full_like(one[0], NAN) for _ in "kv"]
    for layer in range(layers):
        op("write_kv")(batched[0][layer], batched[1][layer], k[layer], v[layer], slots)
    committed = [torch.full_like(one[0], NAN) for _ in "kv"]
    op("kv_commit")(committed[0], committed[1], k, v, torch.arange(40), slots)
    for a, b, c in zip(one, batched, committed):
        assert same_bits(a, b) and same_bits(a, c)


# ---------------------------------------------------------------- attention


class Paged:
    """One sequence's paged caches [NB, BS, Hkv, D] (NaN outside its tokens; blocks in
    shuffled order) holding random K/V for the first `n` positions, with room for `room` more."""

    def __init__(self, n: int, room: int, hk: int, d: int, dtype: torch.dtype, bs: int = 16):
        pages = (n + room + bs - 1) // bs
        nb = pages + 2
        self.bs = bs
        self.table = torch.randperm(nb)[:pages].int()
        self.k = torch.full((nb, bs, hk, d), NAN, dtype=dtype)
        self.v = torch.full_like(self.k, NAN)
        self.n = 0
        self.append(rand(n, hk, d, dtype=dtype), rand(n, hk, d, dtype=dtype))

    def slots(self, start: int, count: int) -> torch.Tensor:
        pos = torch.arange(start, start + count)
        return self.table[pos // self.bs].long() * self.bs + pos % self.bs

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        op("write_kv")(self.k, self.v, k, v, self.slots(self.n, k.shape[0]))
        self.n += k.shape[0]

    def copy(self) -> Paged:
        c = object.__new__(Paged)
        c.bs, c.table, c.k, c.v, c.n = self.bs, self.table, self.k.clone(), self.v.clone(), self.n
        return c

    def keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's K/V rows [n, Hkv, D], in position order."""
        s = self.slots(0, self.n)
        return self.k.flatten(0, 1)[s], self.v.flatten(0, 1)[s]


def causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


def random_tree(n: int, rng: random.Random) -> list[int]:
    """Parents (-1 for the root) of a random tree whose nodes come parents first."""
    return [-1] + [rng.randrange(j) for j in range(1, n)]


def path(parents: list[int], j: int) -> list[int]:
    out = []
    while j >= 0:
        out.append(j)
        j = parents[j]
    return out[::-1]


def decode(q: torch.Tensor, cache: Paged, scale: float) -> torch.Tensor:
    """paged_decode_attention of one query row [H, D] over the whole cache."""
    out = torch.full_like(q, NAN).unsqueeze(0)
    lens = torch.tensor([cache.n], dtype=torch.int32)
    op("paged_decode_attention")(q.unsqueeze(0), cache.k, cache.v, cache.table[None], lens, scale, out=out)
    return out[0]


def tree(q, cache: Paged, k_new, v_new, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """tree_attention of q [T, H, D] over the cache plus scratch rows under `allowed` [T, S]."""
    out = torch.full_like(q, NAN)
    bits = ops.pack_mask(allowed)
    op("tree_attention")(q, cache.k, cache.v, cache.table, cache.n, k_new, v_new, bits, scale, out=out)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS, ids=lambda x: "h{}-{}-{}".format(*x))
@pytest.mark.parametrize("prefix", PREFIXES)
def test_tree_rows_equal_decode_and_prefill(dtype, heads, prefix, threads):
    """Each node of a random draft tree (up to 64 nodes) gets, bit for bit, what plain decoding
    gives the same token (its ancestors' K/V committed at consecutive positions), and what a
    prefill gives it (whole path as one causal chunk, and as a chunk starting inside the prefix)."""
    h, hk, d = heads
    rng = random.Random(prefix * 7 + h)
    scale = d**-0.5
    n = rng.choice([1, 2, 5, 17, 40, 64])
    parents = random_tree(n, rng)
    base = Paged(prefix, n, hk, d, dtype)
    q, k_new, v_new = rand(n, h, d, dtype=dtype), rand(n, hk, d, dtype=dtype), rand(n, hk, d, dtype=dtype)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for j in range(n):
        allowed[j, path(parents, j)] = True
    out = tree(q, base, k_new, v_new, allowed, scale)
    prefix_k, prefix_v = base.keys()
    for j in rng.sample(range(n), min(n, 12)):
        p = path(parents, j)
        committed = base.copy()
        committed.append(k_new[p], v_new[p])
        assert same_bits(out[j], decode(q[j], committed, scale)), f"node {j} (depth {len(p) - 1}) != decode"
        # The path as one causal chunk (K/V not yet in the cache): the last row is node j.
        chunk = tree(q[p], base, k_new[p], v_new[p], causal(len(p)), scale)
        assert same_bits(out[j], chunk[-1]), f"node {j} != prefill chunk"
        # A chunk that starts inside the prefix: tokens [s, prefix) and the path, causal.
        s = rng.randrange(prefix + 1)
        head = Paged(0, prefix, hk, d, dtype)
        head.append(prefix_k[:s], prefix_v[:s])
        kc = torch.cat([prefix_k[s:], k_new[p]])
        vc = torch.cat([prefix_v[s:], v_new[p]])
        qc = torch.cat([rand(prefix - s, h, d, dtype=dtype), q[p]])
        assert same_bits(out[j], tree(qc, head, kc, vc, causal(len(kc)), scale)[-1]), (
            f"node {j} != prefill from {s}"
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(9, 3, 64), (16, 2, 64)], ids=lambda x: "h{}-{}-{}".format(*x))
@pytest.mark.parametrize("prefix", [0, 31, 257])
def test_mask_bits_only_choose_keys(dtype, heads, prefix, threads):
    """Rows under random masks (FIRP's pseudo rows see arbitrary subsets) equal the same row
    alone, given only the scratch rows it sees: masked rows between visible ones change nothing."""
    h, hk, d = heads
    rng = random.Random(prefix + h)
    t, s = 48, 100  # two mask words
    cache = Paged(prefix, 0, hk, d, dtype)
    q, k_new, v_new = rand(t, h, d, dtype=dtype), rand(s, hk, d, dtype=dtype), rand(s, hk, d, dtype=dtype)
    allowed = torch.rand(t, s) < 0.3
    allowed[torch.arange(t), torch.arange(t)] = True
    out = tree(q, cache, k_new, v_new, allowed, d**-0.5)
    for j in rng.sample(range(t), 8):
        seen = allowed[j].nonzero()[:, 0]
        every = torch.ones(1, len(seen), dtype=torch.bool)
        alone = tree(q[j : j + 1], cache, k_new[seen], v_new[seen], every, d**-0.5)
        assert same_bits(out[j], alone[0]), f"row {j} differs from the row alone"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS, ids=lambda x: "h{}-{}-{}".format(*x))
def test_decode_rows_alone_equal_batched(dtype, heads, threads):
    """paged_decode_attention over B sequences of mixed lengths equals each sequence alone."""
    h, hk, d = heads
    rng = random.Random(h * d)
    lens = [rng.choice([1, 31, 32, 33, 255, 256, 257, 600, 1100]) for _ in range(rng.randrange(2, 9))]
    caches = [Paged(n, 0, hk, d, dtype) for n in lens]
    # Stack them into one pool: each sequence's blocks at its own offset.
    nb = [c.k.shape[0] for c in caches]
    offsets = [sum(nb[:i]) for i in range(len(nb))]
    kc, vc = torch.cat([c.k for c in caches]), torch.cat([c.v for c in caches])
    width = max(len(c.table) for c in caches)
    tables = torch.zeros(len(caches), width, dtype=torch.int32)
    for b, c in enumerate(caches):
        tables[b, : len(c.table)] = c.table + offsets[b]
    q = rand(len(lens), h, d, dtype=dtype)
    out = torch.full_like(q, NAN)
    op("paged_decode_attention")(q, kc, vc, tables, torch.tensor(lens, dtype=torch.int32), d**-0.5, out=out)
    for b, c in enumerate(caches):
        assert same_bits(out[b], decode(q[b], c, d**-0.5)), f"sequence {b} (length {lens[b]}) differs"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 2, 128)], ids=lambda x: "h{}-{}-{}".format(*x))
@pytest.mark.parametrize("prefix", [0, 16, 100, 256, 300, 512])
@pytest.mark.parametrize("n_threads", [1, 2, 3, 4])
def test_tree_rows_equal_alone_in_calls_of_any_size(dtype, heads, prefix, n_threads):
    """A draft-tree row gets the same bits alone and inside calls of 1 .. 65 rows, under any
    thread count. The kernel cuts a call's rows into blocks by their number, the prefix
    length and the thread count, lays many rows along the vector lanes padded to whole
    vectors, and shares each key load among them: none of that may reach a row's bits."""
    h, hk, d = heads
    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        rng = random.Random(prefix * 13 + h + n_threads)
        n, scale = 65, d**-0.5
        parents = random_tree(n, rng)  # siblings masked from each other
        cache = Paged(prefix, 0, hk, d, dtype)
        q, k_new, v_new = rand(n, h, d, dtype=dtype), rand(n, hk, d, dtype=dtype), rand(n, hk, d, dtype=dtype)
        allowed = torch.zeros(n, n, dtype=torch.bool)
        for j in range(n):
            allowed[j, path(parents, j)] = True
        alone: dict[int, torch.Tensor] = {}
        for t in [1, 2, 3, 5, 8, 11, 16, 24, 33, 65]:
            rows = sorted(rng.sample(range(n), t))
            out = tree(q[rows], cache, k_new, v_new, allowed[rows], scale)
            for place in rng.sample(range(t), min(t, 6)):
                j = rows[place]
                if j not in alone:
                    p = path(parents, j)
                    every = torch.ones(1, len(p), dtype=torch.bool)
                    alone[j] = tree(q[j : j + 1], cache, k_new[p], v_new[p], every, scale)[0]
                assert same_bits(out[place], alone[j]), f"{t} rows: row {j} differs from the row alone"
    finally:
        torch.set_num_threads(before)
