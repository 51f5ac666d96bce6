"""The cpu backend's C++ layer loop (`_C.LayerStack`, csrc/cpu/layers.cpp) against the Python
layer loop over the same kernels: hidden states, KV pages and scratch rows bit for bit, for
prefill chunks, decode batches and draft trees (masks, scratch regions, layer ranges)."""

import pytest
import torch
from spec_helpers import has_cpu_kernels, tiny_checkpoint

from firp_engine.backend import Backend
from firp_engine.model import Batch, SeqRows, Transformer
from firp_engine.ops import pack_mask

pytestmark = pytest.mark.skipif(not has_cpu_kernels(), reason="C++ extension not built")


def run_both(model: Transformer, make_batch, x: torch.Tensor, start: int = 0, end: int | None = None):
    """forward() through the stack, then through Python, each on a fresh copy of the KV pool
    and of the batch's scratch; returns both (hidden, k pool, v pool, scratch)."""
    stack, cache = model.stack, model.cache
    k0, v0 = cache.k.clone(), cache.v.clone()
    results = []
    for use_stack in (True, False):
        cache.k.copy_(k0)
        cache.v.copy_(v0)
        batch = make_batch()
        model.stack = stack if use_stack else None
        with torch.inference_mode():
            h = model.forward(batch, x.clone(), start, end)
        scratch = tuple(t.clone() for t in batch.scratch) if batch.scratch is not None else ()
        results.append((h, cache.k.clone(), cache.v.clone(), *scratch))
    model.stack = stack
    return results


def assert_bits(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(torch.int16 if x.element_size() == 2 else torch.int32),
                           y.view(torch.int16 if y.element_size() == 2 else torch.int32))  # fmt: skip


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_stack_equals_python_loop(dtype):
    torch.manual_seed(0)
    model = Transformer(tiny_checkpoint(vocab=97, n_layers=3, d=256, seed=1, head_scale=1.0), dtype,
                        Backend.create("cpu"))  # fmt: skip
    assert model.stack is not None and model.stack.n_layers == 3
    cache = model.new_cache(num_blocks=64, block_size=16)
    seqs = [cache.new_sequence() for _ in range(2)]
    dt = model.dtype

    # prefill: 37 and 50 tokens in chunks of 16 (the last one partial), sequence by sequence
    for seq, n in zip(seqs, (37, 50), strict=True):
        for s in range(0, n, 16):
            m = min(16, n - s)
            seq.reserve(s + m)

            def prefill(seq=seq, s=s, m=m):
                return Batch(torch.arange(s, s + m), [SeqRows(seq, 0, m)], "prefill", slots=seq.slots(s, m))

            x = torch.randn(m, 256).to(dt)
            assert_bits(*run_both(model, prefill, x))  # leaves the pool as both left it
            seq.length = s + m

    # decode: one row per sequence
    for seq in seqs:
        seq.reserve(seq.length + 1)

    def decode():
        return Batch(
            torch.tensor([s.length for s in seqs]),
            [SeqRows(s, i, i + 1) for i, s in enumerate(seqs)],
            "decode",
            slots=torch.cat([s.slots(s.length, 1) for s in seqs]),
        )

    assert_bits(*run_both(model, decode, torch.randn(2, 256).to(dt)))

    # a draft tree: 5 rows (root, two children, two grandchildren) for seq 0, a causal chain of
    # 3 for seq 1, scratch regions apart; layers [0, 2) then [2, 3) as FIRP's step does
    parents = [-1, 0, 0, 1, 2]
    vis = torch.zeros(5, 5, dtype=torch.bool)
    for i, p in enumerate(parents):
        vis[i, i] = True
        if p >= 0:
            vis[i] |= vis[p]
    scratch = tuple(torch.zeros(3, 16, model.cfg.n_kv_heads, model.cfg.head_dim, dtype=dt) for _ in "kv")

    def tree():
        pos = torch.tensor(
            [seqs[0].length + d for d in (0, 1, 1, 2, 2)] + [seqs[1].length + d for d in range(3)]
        )
        rows = [SeqRows(seqs[0], 0, 5, pack_mask(vis), scratch_start=0), SeqRows(seqs[1], 5, 8, None, 8)]
        return Batch(pos, rows, "tree", scratch=tuple(t.clone() for t in scratch))

    x = torch.randn(8, 256).to(dt)
    for start, end in ((0, 3), (0, 2), (2, 3)):
        assert_bits(*run_both(model, tree, x, start, end))


def test_stack_only_when_every_layer_op_has_a_kernel():
    ckpt = tiny_checkpoint(vocab=50, n_layers=1, d=256, seed=2, head_scale=1.0)
    assert Transformer(ckpt, "fp32", Backend.create("torch")).stack is None
    cpu = Backend.create("cpu")
    kernels = {op: fn for op, fn in cpu._kernels.items() if op != "rope"}
    partial = Backend("cpu", cpu.device, kernels, cpu.isa, cpu._stack)
    assert "rope" in partial.fallbacks
    assert Transformer(ckpt, "fp32", partial).stack is None


def test_stack_rejects_a_bad_layer_range():
    model = Transformer(tiny_checkpoint(vocab=50, n_layers=2, d=256, seed=3, head_scale=1.0), "fp32",
                        Backend.create("cpu"))  # fmt: skip
    cache = model.new_cache(num_blocks=4)
    seq = cache.new_sequence()
    seq.reserve(1)
    batch = Batch(torch.tensor([0]), [SeqRows(seq, 0, 1)], "decode", slots=seq.slots(0, 1))
    with pytest.raises(RuntimeError, match="outside"), torch.inference_mode():
        model.forward(batch, torch.randn(1, 256), 0, 3)
