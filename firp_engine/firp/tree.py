"""Static FIRP draft trees: shape, positions, masks and pseudo-row layout, built once.

A tree is a list of nodes; node 0 is the root (the token fixed by the previous step, at
the sequence's next position p). A node at depth t >= 1 with rank r stands for "the r-th
likeliest candidate at offset t", so its token is `cands[t - 1, r]` whatever its parent
(candidates come from one node's pseudo rows, which do not branch). A node sits at
position p + t and sees the prefix, its ancestors and itself.

Row layout of one step (the scratch K/V follow it): the n tree nodes first, then k pseudo
rows per spawning node, grouped by node: group g (node spawn[g]) holds offsets 1..k at
rows n + g*k + (i - 1). Pseudo row (j, i) sits at position pos(j) + i and sees the
prefix, node j's ancestors, node j and the rows (j, 1..i) of its own group.

Pseudo policy: "all" nodes spawn k pseudo rows, or only the `top` likeliest ("top"; the
root always). The next tree is drafted from the last accepted node's pseudo rows: offset
i decodes the token at depth i of the next tree (whose root is the bonus token). If that
node spawned none, its deepest spawning ancestor a, delta = depth(node) - depth(a) levels
up, still has offsets delta+1..k that land on the next tree's depths 1..k-delta: the next
tree is then a rank-0 chain of k - delta nodes below the root (root only when delta = k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from firp_engine import ops
from firp_engine.errors import FirpError

# Per-offset acceptance acc[i][r]: P(rank-r candidate at offset i+1 is right | path so far right).
# From DESIGN.md's probe (l=20, 6 epochs): top-1 49.7/25.7/15.6 %, top-5 74.9/51.8/38.1 %.
# Offset i>1 is taken conditional on offset i-1 as the ratio of consecutive figures
# (0.257/0.497, 0.156/0.257 for top-1); the top-5 surplus is spread over ranks 1-4, decaying.
DEFAULT_ACC: list[list[float]] = [
    [0.497, 0.110, 0.065, 0.045, 0.032],
    [0.517, 0.075, 0.045, 0.032, 0.023],
    [0.607, 0.055, 0.033, 0.023, 0.017],
]

POLICIES = ("all", "top")


def default_tree(backend: str) -> tuple[int, str]:
    """(node budget, pseudo-row policy) when the user gives none, chosen by measurement.

    On a CPU every extra row costs compute (the 2-core AVX2 machine is compute-bound from
    about 3 rows per matmul): a 4-node tree whose root alone spawns pseudo rows was the
    fastest configuration on Spec-Bench there (benchmarks/RESULTS.md, "Tree configurations").
    On a GPU a forward is memory-bound up to dozens of rows, so a wider tree costs about the
    same as one row; 10 nodes, all spawning, is the default there (not yet measured on one).
    """
    import torch

    if backend in ("cuda", "triton") and torch.cuda.is_available():
        return 10, "all"
    return 4, "top:1"


def default_acc(k: int) -> list[list[float]]:
    """DEFAULT_ACC cut or extended (by repeating its last offset) to k offsets."""
    return [list(DEFAULT_ACC[min(i, len(DEFAULT_ACC) - 1)]) for i in range(k)]


@dataclass(frozen=True)
class Node:
    parent: int  # -1 for the root
    depth: int
    rank: int  # which top-r candidate at offset `depth` (0 for the root)
    value: float  # product of acc along the path: P(this node is accepted)


class Tree:
    """A draft tree plus everything one forward needs, precomputed (see the module docstring).

    Attributes (n nodes, m spawning nodes, k pseudo offsets each, R = n + m*k rows):
        nodes       list[Node], parents before children, children of a node in rank order
        children    list[list[int]] per node, in rank order (verification tries them in order)
        spawn       node ids that spawn pseudo rows (group g = spawn[g]), root first; spawn_idx as int64
        depth       int64 [n]; rank int64 [n]
        offsets     int64 [R]: position of each row minus p
        tree_bits   int64 [n, ceil(n/64)]: ancestor-or-self mask among tree rows (layers < l)
        full_bits   int64 [R, ceil(R/64)]: the mask of all rows (layers >= l)
        paths       root-to-leaf node lists
        source      per node j: (group, delta) of its deepest ancestor-or-self that spawns;
                    delta = depth(j) - depth(spawn[group])
    """

    def __init__(self, nodes: list[Node], k: int, spawn: list[int]) -> None:
        if not nodes or nodes[0].parent != -1:
            raise FirpError("a draft tree needs a root")
        self.nodes, self.k = nodes, k
        self.spawn = sorted(spawn)
        self.spawn_idx = torch.tensor(self.spawn, dtype=torch.int64)
        n = len(nodes)
        self.n = n
        self.children: list[list[int]] = [[] for _ in range(n)]
        for j, nd in enumerate(nodes[1:], 1):
            self.children[nd.parent].append(j)
        for c in self.children:
            c.sort(key=lambda j: nodes[j].rank)
        self.depth = torch.tensor([nd.depth for nd in nodes], dtype=torch.int64)
        self.rank = torch.tensor([nd.rank for nd in nodes], dtype=torch.int64)
        self.max_depth = int(self.depth.max())
        anc = self._ancestors()
        self.tree_bits = ops.pack_mask(anc)
        self.n_rows = n + len(self.spawn) * k
        self.full_mask = self._full_mask(anc)
        self.full_bits = ops.pack_mask(self.full_mask)
        self.offsets = torch.cat(
            [self.depth, (self.depth[self.spawn][:, None] + torch.arange(1, k + 1)).reshape(-1)]
        ).to(torch.int64)
        self.paths = [self.path(j) for j in range(n) if not self.children[j]]
        self.source = self._sources()

    # ------------------------------------------------------------ construction

    @classmethod
    def build(
        cls, acc: list[list[float]], budget: int, k: int | None = None, policy: str = "all", top: int = 4
    ) -> Tree:
        """Greedy best tree for `budget` nodes (root included) under the acceptance table acc.

        A node's value is the product of acc[depth-1][rank] along its path: the probability
        that it is accepted if those per-offset probabilities are independent. The expected
        number of tokens a step yields is 1 (the bonus) plus the sum of the non-root values.
        Starting from the root, repeatedly add the frontier node of largest value, where the
        frontier of a node is its next child (rank = its current number of children, while
        rank < len(acc[depth])) at depth < len(acc). Values only shrink going down, so every
        tree is closed under parents; the greedy choice maximises the sum of values for the
        budget when acc decreases in rank (then the next-rank-only frontier loses nothing).

        k: pseudo rows per spawning node (the head's k, >= len(acc)); policy "all": every node
        spawns them; "top": only the `top` likeliest nodes (by value; the root always).
        A node that does not spawn drafts the next tree from its deepest spawning ancestor
        (see `source`), which the decoder turns into a shorter chain.
        """
        k = len(acc) if k is None else k
        if budget < 1:
            raise FirpError(f"tree budget must be >= 1, got {budget}")
        if len(acc) > k:
            raise FirpError(f"a tree of depth {len(acc)} needs k >= {len(acc)} pseudo offsets, got {k}")
        if policy not in POLICIES:
            raise FirpError(f"unknown pseudo policy '{policy}' (choose from {', '.join(POLICIES)})")
        nodes = [Node(-1, 0, 0, 1.0)]
        n_kids = [0]
        while len(nodes) < budget:
            best, best_v = -1, 0.0
            for j, nd in enumerate(nodes):
                if nd.depth < len(acc) and n_kids[j] < len(acc[nd.depth]):
                    v = nd.value * acc[nd.depth][n_kids[j]]
                    if v > best_v:
                        best, best_v = j, v
            if best < 0:
                break  # the table allows no more nodes (all probabilities 0 or too shallow)
            nodes.append(Node(best, nodes[best].depth + 1, n_kids[best], best_v))
            n_kids[best] += 1
            n_kids.append(0)
        order = sorted(range(len(nodes)), key=lambda j: -nodes[j].value)  # stable: root first
        spawn = order if policy == "all" else order[: max(1, top)]
        return cls(nodes, k, spawn)

    @classmethod
    def chain(cls, length: int, k: int, policy: str = "all", top: int = 4) -> Tree:
        """Root plus `length` rank-0 nodes (the fallback tree); root only when length = 0.
        Spawning follows `policy` as in build() (the shallowest nodes are the likeliest)."""
        nodes = [Node(-1, 0, 0, 1.0)] + [Node(t - 1, t, 0, 1.0) for t in range(1, length + 1)]
        return cls(nodes, k, list(range(len(nodes) if policy == "all" else min(len(nodes), max(1, top)))))

    # ------------------------------------------------------------ precomputation

    def path(self, j: int) -> list[int]:
        out = []
        while j >= 0:
            out.append(j)
            j = self.nodes[j].parent
        return out[::-1]

    def _ancestors(self) -> torch.Tensor:
        """bool [n, n]: anc[a, b] = node b is node a or one of its ancestors."""
        anc = torch.zeros(self.n, self.n, dtype=torch.bool)
        for j in range(self.n):
            anc[j, self.path(j)] = True
        return anc

    def _full_mask(self, anc: torch.Tensor) -> torch.Tensor:
        n, k, rows = self.n, self.k, self.n_rows
        m = torch.zeros(rows, rows, dtype=torch.bool)
        m[:n, :n] = anc
        causal = torch.ones(k, k, dtype=torch.bool).tril()
        for g, j in enumerate(self.spawn):
            r = n + g * k
            m[r : r + k, :n] = anc[j]
            m[r : r + k, r : r + k] = causal
        return m

    def _sources(self) -> list[tuple[int, int]]:
        group = {j: g for g, j in enumerate(self.spawn)}
        out = []
        for j in range(self.n):
            a = j
            while a not in group:
                a = self.nodes[a].parent
            out.append((group[a], self.nodes[j].depth - self.nodes[a].depth))
        return out

    # ------------------------------------------------------------ use

    def pseudo_rows(self, group: int) -> range:
        """Rows of one spawning node's pseudo group (offsets 1..k)."""
        start = self.n + group * self.k
        return range(start, start + self.k)

    def node_tokens(self, root: int, cands: torch.Tensor) -> torch.Tensor:
        """int64 [n] tokens: the root, then cands[depth - 1, rank] (cands int64 [>= max_depth, R])."""
        toks = torch.empty(self.n, dtype=torch.int64)
        toks[0] = root
        if self.n > 1:
            toks[1:] = cands[self.depth[1:] - 1, self.rank[1:]]
        return toks

    def expected_accepted(self) -> float:
        """Expected tokens per step (bonus included) under the table the tree was built with."""
        return 1.0 + sum(nd.value for nd in self.nodes[1:])

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (
            f"Tree({self.n} nodes, depth {self.max_depth}, {len(self.spawn)} x {self.k} pseudo rows, "
            f"expected accepted {self.expected_accepted():.2f})"
        )

    def __str__(self) -> str:
        spawns = set(self.spawn)
        lines = [repr(self)]

        def show(j: int, indent: str) -> None:
            nd = self.nodes[j]
            label = "root" if j == 0 else f"d{nd.depth} r{nd.rank}  p={nd.value:.3f}"
            lines.append(f"{indent}[{j}] {label}{'  *spawns' if j in spawns else ''}")
            for c in self.children[j]:
                show(c, indent + "  ")

        show(0, "  ")
        return "\n".join(lines)
