"""Paged KV cache: one preallocated pool of fixed-size blocks shared by all sequences.

A sequence owns a list of block ids (its page table). Token t of a sequence lives at
slot `page_table[t // block_size] * block_size + t % block_size` in every layer's pool.
The pool, page tables and slots live on the backend's device; the bookkeeping (which
blocks are free, which a sequence owns) is plain Python.
"""

from __future__ import annotations

import torch

from firp_engine.backend import Backend
from firp_engine.errors import FirpError


class Sequence:
    """One sequence's view of the pool: its pages and how many tokens are committed."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.pages: list[int] = []
        self.length = 0  # tokens whose K/V are in the cache
        self._table: torch.Tensor | None = None

    @property
    def page_table(self) -> torch.Tensor:
        """int32 [n_pages], rebuilt only when the pages change."""
        if self._table is None:
            self._table = torch.tensor(self.pages or [0], dtype=torch.int32, device=self.cache.device)
        return self._table

    def reserve(self, n_tokens: int) -> None:
        """Make room for tokens [0, n_tokens); raises FirpError when the pool is exhausted."""
        bs = self.cache.block_size
        need = (n_tokens + bs - 1) // bs - len(self.pages)
        if need > 0:
            self.pages += self.cache.allocate(need)
            self._table = None

    def slots(self, start: int, n: int) -> torch.Tensor:
        """int64 slots of token positions [start, start + n)."""
        bs = self.cache.block_size
        slots = [self.pages[t // bs] * bs + t % bs for t in range(start, start + n)]
        return torch.tensor(slots, dtype=torch.int64, device=self.cache.device)

    def truncate(self, n_tokens: int) -> None:
        """Forget tokens from n_tokens on, returning whole pages no longer needed."""
        bs = self.cache.block_size
        keep = (n_tokens + bs - 1) // bs
        if keep < len(self.pages):
            self.cache.release(self.pages[keep:])
            self.pages = self.pages[:keep]
            self._table = None
        self.length = min(self.length, n_tokens)

    def commit(self, k_scratch: torch.Tensor, v_scratch: torch.Tensor, rows: list[int]) -> None:
        """Append scratch rows (e.g. an accepted tree path) to the sequence, all layers at once.
        k_scratch/v_scratch [L, S, Hkv, D]."""
        self.reserve(self.length + len(rows))
        dst = self.slots(self.length, len(rows))
        src = torch.tensor(rows, dtype=torch.int64, device=self.cache.device)
        self.cache.backend.call("kv_commit", self.cache.k, self.cache.v, k_scratch, v_scratch, src, dst)
        self.length += len(rows)

    def free(self) -> None:
        self.truncate(0)


class KVCache:
    """The pool: k, v [L, num_blocks, block_size, Hkv, D] on the backend's device."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        backend: Backend,
    ) -> None:
        if num_blocks < 1:
            raise FirpError("KV pool needs at least one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.backend = backend
        self.device = backend.device
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise FirpError(
                f"out of KV blocks: need {n} more, {len(self._free)} of {self.num_blocks} free "
                f"(block size {self.block_size}); raise --kv-blocks or shorten the request"
            )
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def new_sequence(self) -> Sequence:
        return Sequence(self)
