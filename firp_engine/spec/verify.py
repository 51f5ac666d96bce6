"""Verifying a draft tree against the model's own logits: greedy, or lossless sampling.

Both walk the tree from the root and return (path of accepted node ids, root first; the
bonus token). The walks touch a handful of nodes, so they are plain Python over small
lists; anything vocabulary-sized is one tensor op per visited node.
"""

from __future__ import annotations

import torch

from firp_engine.sampling import SamplingParams, probs
from firp_engine.spec.tree import DraftTree


def greedy_walk(
    tree: DraftTree, tokens: list[int], argmax: list[int], max_drafts: int
) -> tuple[list[int], int]:
    """Follow the child whose token is the model's argmax at its parent; tokens/argmax [n]."""
    node, path = 0, [0]
    while len(path) - 1 < max_drafts:
        want = argmax[node]
        nxt = next((c for c in tree.children[node] if tokens[c] == want), None)
        if nxt is None:
            break
        node = nxt
        path.append(node)
    return path, argmax[node]


def accept_prob(q: float, mass: float) -> float:
    """P(accept a deterministic draft x) = p_res(x) = p(x) / (mass left after the rejected siblings)."""
    return q / mass


def try_children(
    p: torch.Tensor, cands: list[int], gen: torch.Generator | None
) -> tuple[int | None, list[int]]:
    """Recursive rejection for point-mass drafts: try each candidate with prob p_res(x); on a
    rejection zero x in p_res and renormalise. Returns (index accepted or None, rejected tokens).
    P(first output = x) = p(x) for every x once the residual sample is added: lossless."""
    if not cands:
        return None, []
    qs = p[cands].tolist()
    mass, rejected = 1.0, []
    for i, (x, q) in enumerate(zip(cands, qs, strict=True)):
        if x in rejected:
            continue  # a repeated draft has p_res = 0
        if mass <= 0:
            break
        if torch.rand((), generator=gen).item() < accept_prob(q, mass):
            return i, rejected
        mass -= q
        rejected.append(x)
    return None, rejected


def residual_sample(p: torch.Tensor, rejected: list[int], gen: torch.Generator | None) -> int:
    """Sample from p with the rejected tokens removed (renormalised by multinomial)."""
    if rejected:
        p = p.clone()
        p[rejected] = 0.0
        if not p.sum() > 0:  # only by rounding: all mass was on rejected tokens
            return rejected[-1]
    return int(torch.multinomial(p, 1, generator=gen))


def sample_walk(
    tree: DraftTree,
    tokens: list[int],
    logits: torch.Tensor,
    params: SamplingParams,
    gen: torch.Generator | None,
    max_drafts: int,
) -> tuple[list[int], int]:
    """Lossless tree verification under sampling: logits fp32 [n, V] of the tree nodes."""
    node, path = 0, [0]
    while True:
        p = probs(logits[node : node + 1], params)[0]
        kids = tree.children[node] if len(path) - 1 < max_drafts else []
        i, rejected = try_children(p, [tokens[c] for c in kids], gen)
        if i is None:
            return path, residual_sample(p, rejected, gen)
        node = kids[i]
        path.append(node)
