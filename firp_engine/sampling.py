"""Turning logits into tokens: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from firp_engine.errors import FirpError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise FirpError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FirpError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise FirpError(f"top-k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, request: int = 0) -> torch.Generator:
        """Request `request`'s own random stream: seeded with seed + request, so a request
        samples the same tokens inside a batch as alone with that seed (no seed: fresh)."""
        g = torch.Generator()
        g.manual_seed(self.seed + request if self.seed is not None else torch.seed())
        return g


def probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution actually sampled from: fp32 [..., V] after temperature, top-k, top-p."""
    x = logits.float() / p.temperature
    if p.top_k:
        kth = torch.topk(x, min(p.top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    pr = torch.softmax(x, dim=-1)
    if p.top_p < 1:
        sorted_p, idx = torch.sort(pr, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        sorted_p = sorted_p.masked_fill(before >= p.top_p, 0.0)
        pr = torch.zeros_like(pr).scatter_(-1, idx, sorted_p)
        pr = pr / pr.sum(-1, keepdim=True)
    return pr


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (int64)."""
    if p.greedy:
        return logits.argmax(-1)
    return torch.multinomial(probs(logits, p), 1, generator=gen).squeeze(-1)
