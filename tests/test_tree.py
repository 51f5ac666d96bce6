"""Draft trees (spec/tree.py): greedy construction, masks, positions; FIRP's pseudo-row
layout (firp/pseudo.py)."""

import itertools

import pytest
import torch

from firp_engine import ops
from firp_engine.errors import FirpError
from firp_engine.firp.pseudo import PseudoLayout, parse_policy, spawning
from firp_engine.spec.tree import DEFAULT_ACC, DraftTree, default_acc


def layout(tree: DraftTree, k: int, policy: str = "all", top: int = 4) -> PseudoLayout:
    return PseudoLayout(tree, 2, k, spawning(tree, policy, top))


def ancestors_of(tree: DraftTree, j: int) -> set[int]:
    out = {j}
    while tree.nodes[j].parent >= 0:
        j = tree.nodes[j].parent
        out.add(j)
    return out


@pytest.mark.parametrize("budget", [1, 2, 5, 10, 17, 40])
def test_budget_and_shape(budget):
    tree = DraftTree.build(default_acc(3), budget)
    max_nodes = 1 + 5 + 25 + 125
    assert tree.n == min(budget, max_nodes)
    assert tree.max_depth <= 3
    for j, nd in enumerate(tree.nodes[1:], 1):
        assert nd.parent < j  # parents first
        assert nd.depth == tree.nodes[nd.parent].depth + 1
        ranks = [tree.nodes[c].rank for c in tree.children[nd.parent]]
        assert ranks == list(range(len(ranks)))  # siblings are ranks 0..c-1, in order
    assert layout(tree, 3).n_rows == tree.n + tree.n * 3


def test_printable():
    lay = layout(DraftTree.build(DEFAULT_ACC, 10), 3, "top", 3)
    text = str(lay)
    assert "root" in text and "d1 r0" in text and text.count("spawns") == 3
    assert text.count("\n") == lay.tree.n + 1
    assert "10 nodes" in repr(lay.tree)


def test_greedy_is_optimal_for_small_budgets():
    """Brute force over every parent-closed, rank-contiguous tree of 2 offsets x 3 ranks."""
    acc = [[0.5, 0.2, 0.1], [0.6, 0.15, 0.05]]
    cand = [(r,) for r in range(3)] + [(a, b) for a in range(3) for b in range(3)]

    def value(path):
        v = 1.0
        for d, r in enumerate(path):
            v *= acc[d][r]
        return v

    def closed(nodes):
        s = set(nodes)
        return all((len(p) == 1 or p[:-1] in s) and (p[-1] == 0 or p[:-1] + (p[-1] - 1,) in s) for p in nodes)

    for budget in range(1, 8):
        best = max(
            sum(value(p) for p in sub)
            for n in range(min(budget, len(cand) + 1))
            for sub in itertools.combinations(cand, n)
            if closed(sub)
        )
        tree = DraftTree.build(acc, budget)
        assert tree.expected_accepted() - 1 == pytest.approx(best)


@pytest.mark.parametrize("policy,top", [("all", 4), ("top", 3), ("top", 1)])
def test_masks_positions_and_pseudo_rows(policy, top):
    lay = layout(DraftTree.build(default_acc(3), 12), 3, policy, top)
    tree, n = lay.tree, lay.tree.n
    assert len(lay.spawn) == (n if policy == "all" else top)
    assert lay.spawn[0] == 0  # the root always spawns
    anc = ops.unpack_mask(tree.tree_bits, n)
    full = ops.unpack_mask(lay.full_bits, lay.n_rows)
    assert tree.tree_bits.dtype == torch.int64
    assert lay.full_bits.shape == (lay.n_rows, (lay.n_rows + 63) // 64)
    for j in range(n):
        want = ancestors_of(tree, j)
        assert set(torch.nonzero(anc[j]).flatten().tolist()) == want
        assert set(torch.nonzero(full[j]).flatten().tolist()) == want  # tree rows never see pseudo rows
        assert lay.offsets[j] == tree.depth[j] == tree.nodes[j].depth
    for g, j in enumerate(lay.spawn):
        rows = list(lay.pseudo_rows(g))
        for i, r in enumerate(rows, 1):
            seen = set(torch.nonzero(full[r]).flatten().tolist())
            assert seen == ancestors_of(tree, j) | set(rows[:i])
            assert lay.offsets[r] == tree.nodes[j].depth + i
    for path in tree.paths:
        assert path[0] == 0 and not tree.children[path[-1]]
    assert len(tree.paths) == sum(1 for c in tree.children if not c)


def test_sources_and_node_tokens():
    lay = layout(DraftTree.build(default_acc(3), 10), 3, "top", 2)
    tree, spawning = lay.tree, set(lay.spawn)
    for j, (g, delta) in enumerate(lay.source):
        a = lay.spawn[g]
        assert a in ancestors_of(tree, j) and delta == tree.nodes[j].depth - tree.nodes[a].depth
        assert (delta == 0) == (j in spawning)
    cands = torch.arange(3 * 5).reshape(3, 5) + 100
    toks = tree.node_tokens(7, cands)
    assert toks[0] == 7
    for j in range(1, tree.n):
        assert toks[j] == 100 + 5 * (tree.nodes[j].depth - 1) + tree.nodes[j].rank


def test_chain_and_errors():
    c = DraftTree.chain(2)
    assert c.n == 3 and c.max_depth == 2 and c.paths == [[0, 1, 2]]
    assert DraftTree.chain(0).n == 1 and layout(DraftTree.chain(0), 3).n_rows == 4
    assert len(layout(DraftTree.chain(3), 3, "top", 2).spawn) == 2
    with pytest.raises(FirpError):
        DraftTree.build(DEFAULT_ACC, 0)
    with pytest.raises(FirpError, match="root"):
        PseudoLayout(DraftTree.build(DEFAULT_ACC, 5), 2, 3, [1, 2])
    for bad in ("some", "all:2", "top:x"):
        with pytest.raises(FirpError, match="pseudo policy"):
            parse_policy(bad)
    assert parse_policy("top") == ("top", 4) and parse_policy("top:2") == ("top", 2)
    assert DraftTree.build([[0.0]], 5).n == 1  # zero-probability drafts are never added
