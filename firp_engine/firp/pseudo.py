"""FIRP's pseudo rows: which tree nodes spawn them, where they sit and what they see.

Row layout of one step (the scratch K/V follow it): the n tree nodes first, then k pseudo
rows per spawning node, grouped by node: group g (node spawn[g]) holds offsets 1..k at
rows n + g*k + (i - 1). Pseudo row (j, i) sits at position pos(j) + i and sees the
prefix, node j's ancestors, node j and the rows (j, 1..i) of its own group. The pseudo
rows join the forward after layers [0, layer) have run on the tree rows alone.

Policy: "all" nodes spawn k pseudo rows, or only the `top` likeliest ("top"; the root
always). The next tree is drafted from the last accepted node's pseudo rows: offset i
decodes the token at depth i of the next tree (whose root is the bonus token). If that node
spawned none, its deepest spawning ancestor a, delta = depth(node) - depth(a) levels up,
still has offsets delta+1..k that land on the next tree's depths 1..k-delta: the next tree
is then a rank-0 chain of k - delta nodes below the root (root only when delta = k).
"""

from __future__ import annotations

import torch

from firp_engine import ops
from firp_engine.errors import FirpError
from firp_engine.spec.tree import DraftTree

POLICIES = ("all", "top")


def spawning(tree: DraftTree, policy: str, top: int) -> list[int]:
    """The nodes that spawn pseudo rows: all, or the `top` likeliest (the root always)."""
    order = sorted(range(tree.n), key=lambda j: -tree.nodes[j].value)
    return sorted(order if policy == "all" else order[: max(1, top)])


def parse_policy(policy: str) -> tuple[str, int]:
    """'all', 'top' (the 4 likeliest nodes spawn) or 'top:M' -> (name, M)."""
    name, _, m = policy.partition(":")
    if name not in POLICIES or (m and not m.isdigit()) or (name == "all" and m):
        raise FirpError(f"bad pseudo policy '{policy}' (use all, top or top:M)")
    return name, int(m) if m else 4


class PseudoLayout:
    """A draft tree plus its pseudo rows; what the speculative step reads as `Draft.layout`.

    Attributes (n nodes, m spawning nodes, R = n + m*k rows):
        tree        the DraftTree
        layer, k    pseudo rows join after layers [0, layer); k offsets per spawning node
        spawn       node ids that spawn pseudo rows (group g = spawn[g]), root first; spawn_idx int64
        n_rows      R
        offsets     int64 [R]: position of each row minus p
        full_bits   int64 [R, ceil(R/64)]: the mask of all rows (layers >= layer)
        source      per node j: (group, delta) of its deepest ancestor-or-self that spawns;
                    delta = depth(j) - depth(spawn[group])
    """

    def __init__(self, tree: DraftTree, layer: int, k: int, spawn: list[int]) -> None:
        if not spawn or min(spawn) != 0:
            raise FirpError("the root of a FIRP draft tree must spawn pseudo rows")
        self.tree, self.layer, self.k = tree, layer, k
        self.spawn = sorted(spawn)
        self.spawn_idx = torch.tensor(self.spawn, dtype=torch.int64)
        self.n_rows = tree.n + len(self.spawn) * k
        self.full_mask = self._full_mask()
        self.full_bits = ops.pack_mask(self.full_mask)
        spawn_depth = tree.depth[self.spawn][:, None]
        self.offsets = torch.cat([tree.depth, (spawn_depth + torch.arange(1, k + 1)).reshape(-1)])
        self.source = self._sources()

    def _full_mask(self) -> torch.Tensor:
        n, k, anc = self.tree.n, self.k, self.tree.ancestors
        m = torch.zeros(self.n_rows, self.n_rows, dtype=torch.bool)
        m[:n, :n] = anc
        causal = torch.ones(k, k, dtype=torch.bool).tril()
        for g, j in enumerate(self.spawn):
            r = n + g * k
            m[r : r + k, :n] = anc[j]
            m[r : r + k, r : r + k] = causal
        return m

    def _sources(self) -> list[tuple[int, int]]:
        group = {j: g for g, j in enumerate(self.spawn)}
        nodes, out = self.tree.nodes, []
        for j in range(self.tree.n):
            a = j
            while a not in group:
                a = nodes[a].parent
            out.append((group[a], nodes[j].depth - nodes[a].depth))
        return out

    def pseudo_rows(self, group: int) -> range:
        """Rows of one spawning node's pseudo group (offsets 1..k)."""
        start = self.tree.n + group * self.k
        return range(start, start + self.k)

    def __str__(self) -> str:
        return f"{self.tree.show(set(self.spawn), '  *spawns')}\n  {len(self.spawn)} x {self.k} pseudo rows"
