"""Paged KV cache: allocation, freeing, exhaustion, commit."""

import pytest
import torch

from firp_engine.backend import Backend, available_backends
from firp_engine.errors import FirpError
from firp_engine.kv_cache import KVCache


def make(blocks=8, bs=4, backend: Backend | None = None):
    return KVCache(2, 2, 8, blocks, bs, torch.float32, backend or Backend.create("torch"))


def test_reserve_allocates_whole_blocks_and_free_returns_them():
    cache = make()
    a, b = cache.new_sequence(), cache.new_sequence()
    a.reserve(5)  # 2 blocks of 4
    b.reserve(4)
    assert len(a.pages) == 2 and len(b.pages) == 1
    assert cache.free_blocks == 5
    assert not set(a.pages) & set(b.pages)
    a.free()
    assert cache.free_blocks == 7 and a.pages == []
    a.reserve(12)
    assert len(a.pages) == 3 and cache.free_blocks == 4


def test_slots_follow_the_page_table():
    cache = make()
    other = cache.new_sequence()
    other.reserve(4)
    s = cache.new_sequence()
    s.reserve(10)
    slots = s.slots(0, 10).tolist()
    bs = cache.block_size
    assert slots == [s.pages[t // bs] * bs + t % bs for t in range(10)]
    assert not set(slots) & set(other.slots(0, 4).tolist())


def test_exhaustion_is_a_clear_error_and_loses_nothing():
    cache = make(blocks=3)
    s = cache.new_sequence()
    s.reserve(8)
    with pytest.raises(FirpError, match="out of KV blocks"):
        s.reserve(100)
    assert len(s.pages) == 2 and cache.free_blocks == 1


def test_truncate_frees_trailing_pages():
    cache = make()
    s = cache.new_sequence()
    s.reserve(16)
    s.length = 16
    s.truncate(5)
    assert s.length == 5 and len(s.pages) == 2 and cache.free_blocks == 6


@pytest.mark.filterwarnings("ignore::firp_engine.errors.FirpWarning")  # triton's missing ops
@pytest.mark.parametrize("backend", available_backends())
def test_commit_moves_scratch_rows_into_place(backend):
    """Through the cache's own backend: its kv_commit kernel (recorded) does the move."""
    calls = []
    chosen = Backend.create(backend)

    def recorded(*args):
        calls.append(args)
        return chosen.op("kv_commit")(*args)

    cache = make(backend=Backend(backend, chosen.device, {"kv_commit": recorded}))
    s = cache.new_sequence()
    s.reserve(3)
    s.length = 3
    k_scr = torch.randn(2, 6, 2, 8)
    v_scr = torch.randn(2, 6, 2, 8)
    before = cache.k.clone()
    with torch.no_grad():  # as in inference (with autograd on, the reference would run)
        s.commit(k_scr, v_scr, [0, 2, 5])
    assert len(calls) == 1 and calls[0][0] is cache.k
    assert s.length == 6
    flat_k = cache.k.view(2, -1, 2, 8)
    flat_v = cache.v.view(2, -1, 2, 8)
    dst = s.slots(3, 3)
    assert torch.equal(flat_k[:, dst], k_scr[:, [0, 2, 5]])
    assert torch.equal(flat_v[:, dst], v_scr[:, [0, 2, 5]])
    untouched = torch.ones(flat_k.shape[1], dtype=torch.bool)
    untouched[dst] = False
    assert torch.equal(flat_k[:, untouched], before.view(2, -1, 2, 8)[:, untouched])
