"""Draft trees for one speculative step: shape, parent links and the ancestor mask.

A tree is a list of nodes; node 0 is the root (the token fixed by the previous step, at
the sequence's next position p). A node at depth t >= 1 with rank r stands for "the r-th
candidate at offset t" (its token is `cands[t - 1, r]` whatever its parent, for drafters
whose candidates do not branch) and sits at position p + t, seeing the prefix, its
ancestors and itself. Nodes come parents first, so a node's scratch row follows its
ancestors' rows: the rows a node sees are in position order.

Drafters that add rows of their own (FIRP's pseudo rows, `firp/pseudo.py`) lay them out
after the n tree rows.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import torch

from firp_engine import ops
from firp_engine.errors import FirpError

# Per-offset acceptance acc[i][r]: P(rank-r candidate at offset i+1 is right | path so far right).
# From the design notes' probe of a FIRP head (l=20, 6 epochs): top-1 49.7/25.7/15.6 %,
# top-5 74.9/51.8/38.1 %; used when a head carries no measured table of its own.
# Offset i>1 is taken conditional on offset i-1 as the ratio of consecutive figures
# (0.257/0.497, 0.156/0.257 for top-1); the top-5 surplus is spread over ranks 1-4, decaying.
DEFAULT_ACC: list[list[float]] = [
    [0.497, 0.110, 0.065, 0.045, 0.032],
    [0.517, 0.075, 0.045, 0.032, 0.023],
    [0.607, 0.055, 0.033, 0.023, 0.017],
]


def default_tree(device: torch.device) -> tuple[int, str]:
    """(node budget, FIRP pseudo-row policy) when the user gives none, chosen by measurement.

    On a CPU every extra row of a small-M matmul costs compute once the kernel is no longer
    bandwidth-bound: a 4-node tree whose root alone spawns pseudo rows was the fastest
    configuration on Spec-Bench (benchmarks/RESULTS.md, "Tree configurations"). On a GPU a
    forward is memory-bound up to dozens of rows, so a wider tree costs about the same as one
    row: 10 nodes, all spawning (not yet measured on one).
    """
    if device.type == "cuda":
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


def grow(budget: int, kids: Callable[[list[int]], list[tuple[int, float]]]) -> tuple[list[Node], list[int]]:
    """Best-first tree growth: the `budget` nodes (root included) of largest value.

    A node's value is the product of the conditional probabilities along its path: the
    chance it is accepted if they are independent, so a step yields 1 (the bonus) plus the
    sum of the non-root values in expectation. kids(labels) gives the candidate children of
    the node reached from the root by `labels`, as (label, p) in decreasing p with distinct
    labels. Starting from the root, repeatedly add the frontier node of largest value, where
    a node's frontier is its next candidate child; values only shrink going down, so the
    tree is closed under parents, and the greedy choice maximises the sum of values for the
    budget (the next-candidate-only frontier loses nothing as p decreases). Ties go to the
    earlier node. Returns the nodes (rank = index among the parent's candidates) and their
    labels (-1 for the root).
    """
    nodes, labels, paths = [Node(-1, 0, 0, 1.0)], [-1], [[]]
    cands = [kids([])]
    frontier: list[tuple[float, int, int]] = []  # (-value, node, index of its next candidate)
    if cands[0]:
        heapq.heappush(frontier, (-cands[0][0][1], 0, 0))
    while frontier and len(nodes) < budget:
        neg_v, j, i = heapq.heappop(frontier)
        if neg_v >= 0:
            break  # zero-probability candidates are never drafted
        label = cands[j][i][0]
        nodes.append(Node(j, nodes[j].depth + 1, i, -neg_v))
        labels.append(label)
        paths.append([*paths[j], label])
        cands.append(kids(paths[-1]))
        if i + 1 < len(cands[j]):
            heapq.heappush(frontier, (-nodes[j].value * cands[j][i + 1][1], j, i + 1))
        if cands[-1]:
            heapq.heappush(frontier, (-nodes[-1].value * cands[-1][0][1], len(nodes) - 1, 0))
    return nodes, labels


class DraftTree:
    """A draft tree plus the masks a forward needs, precomputed (see the module docstring).

    Attributes (n nodes):
        nodes       list[Node], parents before children, children of a node in rank order
        children    list[list[int]] per node, in rank order (verification tries them in order)
        depth       int64 [n] (= each row's position minus p); rank int64 [n]
        tree_bits   int64 [n, ceil(n/64)]: ancestor-or-self mask among the tree rows
        paths       root-to-leaf node lists
    """

    def __init__(self, nodes: list[Node]) -> None:
        if not nodes or nodes[0].parent != -1:
            raise FirpError("a draft tree needs a root")
        self.nodes = nodes
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
        self.ancestors = self._ancestors()
        self.tree_bits = ops.pack_mask(self.ancestors)
        self.paths = [self.path(j) for j in range(n) if not self.children[j]]

    # ------------------------------------------------------------ construction

    @classmethod
    def build(cls, acc: list[list[float]], budget: int) -> DraftTree:
        """The best static tree for `budget` nodes (root included) under the acceptance table
        acc: acc[t][r] = P(rank-r candidate at offset t+1 is right | the path to it is right).
        Node (depth, rank) stands for candidate `rank` at offset `depth`; see `grow`."""
        if budget < 1:
            raise FirpError(f"tree budget must be >= 1, got {budget}")

        def kids(path: list[int]) -> list[tuple[int, float]]:
            return list(enumerate(acc[len(path)])) if len(path) < len(acc) else []

        return cls(grow(budget, kids)[0])

    @classmethod
    def chain(cls, length: int) -> DraftTree:
        """Root plus `length` rank-0 nodes; root only when length = 0."""
        return cls([Node(-1, 0, 0, 1.0)] + [Node(t - 1, t, 0, 1.0) for t in range(1, length + 1)])

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

    # ------------------------------------------------------------ use

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
        expected = self.expected_accepted()
        return f"DraftTree({self.n} nodes, depth {self.max_depth}, expected accepted {expected:.2f})"

    def show(self, marked: set[int] = frozenset(), mark: str = "") -> str:
        """The tree as indented text; nodes in `marked` get `mark` appended."""
        lines = [repr(self)]

        def show(j: int, indent: str) -> None:
            nd = self.nodes[j]
            label = "root" if j == 0 else f"d{nd.depth} r{nd.rank}  p={nd.value:.3f}"
            lines.append(f"{indent}[{j}] {label}{mark if j in marked else ''}")
            for c in self.children[j]:
                show(c, indent + "  ")

        show(0, "  ")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.show()
