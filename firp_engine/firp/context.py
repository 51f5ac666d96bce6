"""The context pass of head training (no grad): the whole model over one sequence with a
dense causal attention, keeping the layer-l residual at every position, the post-RoPE K/V of
every upper layer and the teacher's top-n logits (+ full log-sum-exp) at every reply position.

It costs more than the pseudo pass, so `ContextStore` can keep it on disk, keyed by the
model's fingerprint and the sequence: later epochs, other layers, other k, the Medusa
baseline and the analyses reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from firp_engine import ops
from firp_engine.model import Transformer

Example = tuple[list[int], list[int]]  # (prompt ids, reply ids)


@dataclass
class Context:
    """What the no-grad pass keeps of one sequence of T tokens (teacher rows from row0 on)."""

    length: int  # T
    n_prompt: int
    h: dict[int, torch.Tensor]  # layer l -> [T, d], the residual entering layer l
    k: dict[int, torch.Tensor]  # layer i -> [T, Hkv, D] post-RoPE, for every i >= min(h)
    v: dict[int, torch.Tensor]  # layer i -> [T, Hkv, D]
    top_ids: torch.Tensor  # int64 [T - row0, n_top]: row j's teacher candidates for token j+1, best first
    top_logits: torch.Tensor  # fp32 [T - row0, n_top]
    lse: torch.Tensor  # fp32 [T - row0]: log-sum-exp of the teacher's full logits
    row0: int
    ids: torch.Tensor | None = None  # int64 [T], the tokens (set by ContextStore.get, not cached)

    def covers(self, layers: list[int], n_top: int, row0: int) -> bool:
        kv_from = min(layers)
        return (
            all(x in self.h for x in layers)
            and min(self.k, default=kv_from + 1) <= kv_from
            and self.top_ids.shape[1] >= n_top
            and self.row0 <= row0
        )

    def to_disk(self) -> dict:
        """K/V as fp16 (half the bytes; ~1e-3 relative error, far below what training resolves)."""
        d = asdict(self)
        d["k"] = {i: x.half() for i, x in self.k.items()}
        d["v"] = {i: x.half() for i, x in self.v.items()}
        d["top_ids"] = self.top_ids.int()
        d.pop("ids")  # the example has them: caches from before this field stay valid
        return d

    @classmethod
    def from_disk(cls, d: dict) -> Context:
        d = dict(d)
        d["top_ids"] = d["top_ids"].long()
        return cls(**d)


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[S, Hkv, D] -> [S, H, D]; query head j reads KV head j // (H / Hkv), as in ops.attend."""
    return x.repeat_interleave(n_heads // x.shape[1], dim=1)


def run_context(
    model: Transformer, ids: torch.Tensor, layers: list[int]
) -> tuple[dict, dict, dict, torch.Tensor]:
    """ids int64 [T] -> (h entering each of `layers`, K and V of every layer >= min(layers),
    final hidden states [T, d]). Dense causal attention: ops' reference, as inference runs it."""
    hs: dict[int, torch.Tensor] = {}
    ks: dict[int, torch.Tensor] = {}
    vs: dict[int, torch.Tensor] = {}
    causal = torch.ones(ids.shape[0], ids.shape[0], dtype=torch.bool).tril()

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [T, H, D], k/v [T, Hkv, D]
        if i >= min(layers):
            ks[i], vs[i] = k.clone(), v.clone()
        return ops.attend(q, k, v, causal, model.scale)

    positions = torch.arange(ids.shape[0])
    x = model.embed_tokens(ids)
    for i in range(model.cfg.n_layers):
        if i in layers:
            hs[i] = x.clone()  # run_layer works in place without autograd
        x = model.run_layer(i, x, positions, attend)
    return hs, ks, vs, x


@torch.no_grad()
def context_pass(
    model: Transformer,
    example: Example,
    layers: list[int],
    n_top: int,
    max_len: int,
    with_prompt: bool = False,
) -> Context:
    """The no-grad pass over one sequence. The teacher's top-n is kept for reply rows only
    (where targets live), or for every row `with_prompt`: the LM head is the dearest part."""
    prompt, reply = example
    ids = torch.tensor((list(prompt) + list(reply))[:max_len], dtype=torch.int64)
    t, n_prompt = ids.shape[0], min(len(prompt), ids.shape[0])
    hs, ks, vs, h_final = run_context(model, ids, layers)
    row0 = 0 if with_prompt else n_prompt
    top_ids, top_logits, lse = (
        [torch.zeros(0, n_top, dtype=torch.int64)],
        [torch.zeros(0, n_top)],
        [torch.zeros(0)],
    )
    for a in range(row0, t, 256):
        logits = model.logits(h_final[a : a + 256])  # [<=256, V] fp32
        top = logits.topk(n_top, dim=-1)
        top_ids.append(top.indices)
        top_logits.append(top.values)
        lse.append(logits.logsumexp(-1))
    return Context(t, n_prompt, hs, ks, vs, torch.cat(top_ids), torch.cat(top_logits), torch.cat(lse), row0)


class ContextStore:
    """Context passes, optionally cached on disk per sequence: one pass serves every epoch,
    every layer of a sweep (when `layers` lists them all) and every k."""

    def __init__(
        self,
        model: Transformer,
        layers: list[int],
        n_top: int,
        max_len: int,
        with_prompt: bool = False,
        cache_dir: str | Path | None = None,
        key: str = "",
    ) -> None:
        self.model, self.layers, self.n_top, self.max_len = model, sorted(set(layers)), n_top, max_len
        self.with_prompt = with_prompt
        self.dir = Path(cache_dir) if cache_dir else None
        self.key = key  # the model's fingerprint: a cache never serves another model
        self.computed = self.loaded = 0
        self.cpu_s = self.wall_s = 0.0  # spent computing passes

    def _path(self, example: Example) -> Path:
        h = hashlib.sha1(f"{self.key}:{self.max_len}:".encode())
        h.update(json.dumps([list(example[0]), list(example[1])]).encode())
        return self.dir / f"{h.hexdigest()[:20]}.pt"

    def get(self, example: Example, layers: list[int] | None = None) -> Context:
        ctx = self._get(example, layers)
        ctx.ids = torch.tensor((list(example[0]) + list(example[1]))[: ctx.length], dtype=torch.int64)
        return ctx

    def _get(self, example: Example, layers: list[int] | None = None) -> Context:
        need = layers or self.layers
        row0 = 0 if self.with_prompt else min(len(example[0]), self.max_len)
        path = self._path(example) if self.dir else None
        if path is not None and path.is_file():
            try:
                ctx = Context.from_disk(torch.load(path, weights_only=True))
                if ctx.covers(need, self.n_top, row0):
                    self.loaded += 1
                    return ctx
            except (RuntimeError, OSError, TypeError, KeyError, EOFError):
                pass  # unreadable or old format: recompute
        c0, w0 = time.process_time(), time.monotonic()
        ctx = context_pass(
            self.model,
            example,
            sorted(set(need) | set(self.layers)),
            self.n_top,
            self.max_len,
            self.with_prompt,
        )
        self.cpu_s += time.process_time() - c0
        self.wall_s += time.monotonic() - w0
        self.computed += 1
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(ctx.to_disk(), tmp)
            tmp.replace(path)
        return ctx

    def stats(self) -> dict:
        return {
            "computed": self.computed,
            "loaded": self.loaded,
            "cpu_s": round(self.cpu_s, 1),
            "wall_s": round(self.wall_s, 1),
        }
