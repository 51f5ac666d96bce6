"""FIRP speculative decoding: verification and the next draft share one forward per step.

A step's input is a static draft tree (tree.py) whose root is the pending token (the last
accepted one, not yet in the cache). Layers [0, l) run on the tree rows; the head turns
the layer-l states of the spawning nodes into k pseudo rows each, appended after the tree
rows; layers [l, L) run on all rows with the tree/pseudo mask. The tree nodes' logits
verify the drafts (greedy walk, or lossless rejection sampling); the last accepted node's
logits give the bonus token and its pseudo rows' top-R candidates give the next tree.
Only the accepted nodes' K/V (kept in a scratch buffer during the forward) are committed.

Prefill writes all prompt tokens but the last; the last one is the root of a one-node
tree step, so the first step is no special case.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from firp_engine.errors import FirpError
from firp_engine.firp.head import FirpHead, resolve_head
from firp_engine.firp.tree import Tree, default_acc, default_tree
from firp_engine.firp.verify import greedy_walk, sample_walk
from firp_engine.generate import State, prefill
from firp_engine.model import Batch, SeqRows
from firp_engine.sampling import SamplingParams


@dataclass
class StepStats:
    """Acceptance figures: tokens per step (bonus included) and per-offset rank hits.

    hits[i][r] / trials[i] estimates acc[i][r] of tree.py (rank-r candidate right at offset
    i+1 given the path to it was right), measured on steps drafted from the accepted node's
    own pseudo rows; feed `acc_table()` to Tree.build.
    """

    steps: int = 0
    tokens: int = 0
    hist: dict[int, int] = field(default_factory=dict)  # tokens per step -> steps
    hits: list[list[int]] = field(default_factory=list)
    trials: list[int] = field(default_factory=list)

    @property
    def mean_accepted(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    def reset(self) -> None:
        self.__init__()

    def add(self, n_tokens: int, hit: list[list[bool]]) -> None:
        """One step: n_tokens returned; hit[d][r] = rank r at offset d+1 was the true token."""
        self.steps += 1
        self.tokens += n_tokens
        self.hist[n_tokens] = self.hist.get(n_tokens, 0) + 1
        for d, row in enumerate(hit):
            while len(self.trials) <= d:
                self.trials.append(0)
                self.hits.append([])
            self.trials[d] += 1
            h = self.hits[d]
            h.extend([0] * (len(row) - len(h)))
            for r, b in enumerate(row):
                h[r] += b

    def acc_table(self) -> list[list[float]]:
        return [[x / t for x in h] for h, t in zip(self.hits, self.trials, strict=True) if t]


step_stats = StepStats()  # every FirpDecoder's steps since the last step_stats.reset()


def parse_policy(policy: str) -> tuple[str, int]:
    """'all', 'top' (the 4 likeliest nodes spawn) or 'top:M'."""
    name, _, m = policy.partition(":")
    if name not in ("all", "top") or (m and not m.isdigit()) or (name == "all" and m):
        raise FirpError(f"bad pseudo policy '{policy}' (use all, top or top:M)")
    return name, int(m) if m else 4


class FirpDecoder:
    """One request at a time (trees are per sequence); see the module docstring."""

    batched = False

    def __init__(
        self,
        llm,
        params: SamplingParams,
        head: FirpHead | str | Path | None = None,
        tree_budget: int | None = None,
        pseudo_policy: str | None = None,
        acc: list[list[float]] | None = None,
        **_: object,
    ) -> None:
        self.model = llm.model
        self.params = params
        self.chunk = llm.prefill_chunk
        self.max_context = llm.max_context
        cfg = self.model.cfg
        h = resolve_head(llm, head, FirpHead, "firp")
        if h.weight.shape[-1] != cfg.hidden_size or not 0 < h.layer < cfg.n_layers:
            raise FirpError(
                f"FIRP head (d={h.weight.shape[-1]}, layer {h.layer}) does not fit this model "
                f"(d={cfg.hidden_size}, {cfg.n_layers} layers)"
            )
        # A private copy in the run's dtype, so the projection does not cast weights every step.
        self.head = copy.deepcopy(h).to(self.model.dtype).requires_grad_(False)
        self.layer, self.k = h.layer, h.k
        budget, default_policy = default_tree(llm.backend)
        tree_budget = tree_budget or budget
        policy, top = parse_policy(pseudo_policy or default_policy)
        acc = [list(r) for r in (acc or h.meta.get("acc") or default_acc(self.k))][: self.k]
        self.width = min(max(len(r) for r in acc), cfg.vocab_size)  # candidates kept per offset
        self.tree = Tree.build(acc, tree_budget, self.k, policy, top)
        # delta = depth of the accepted node below its nearest spawning ancestor: the
        # ancestor's offsets delta+1..k draft a chain (root only once they run out).
        self.fallback = {d: Tree.chain(max(0, self.k - d), self.k, policy, top) for d in range(1, self.k + 1)}
        self.root_tree = Tree.chain(0, self.k, policy, top)
        rows = max(t.n_rows for t in [self.tree, self.root_tree, *self.fallback.values()])
        shape = (cfg.n_layers, rows, cfg.n_kv_heads, cfg.head_dim)
        self.scratch = (
            torch.empty(shape, dtype=self.model.dtype),
            torch.empty(shape, dtype=self.model.dtype),
        )
        self.stats = StepStats()

    # ------------------------------------------------------------ driver hooks

    def prefill(self, st: State) -> list[int]:
        prefill(self.model, st.seq, st.tokens[:-1], self.chunk)
        self.start(st)
        return self.run_step(st)

    def start(self, st: State) -> None:
        """Make the pending token a one-node tree (the state after prefill)."""
        st.extra.update(tree=self.root_tree, cands=torch.empty(0, self.width, dtype=torch.int64), own=False)

    def step(self, states: list[State]) -> list[list[int]]:
        return [self.run_step(st, count=True) for st in states]

    # ------------------------------------------------------------ one step

    def forward_tree(self, st: State, tree: Tree, tokens: torch.Tensor) -> torch.Tensor:
        """The step's one forward: final hidden rows [tree.n_rows, d] (tree nodes, then pseudo rows).
        tokens int64 [tree.n]; K/V of all rows land in self.scratch."""
        model, n = self.model, tree.n
        pos = (st.seq.length + tree.offsets).clamp_(max=model.cos.shape[0] - 1)  # past the end: discarded
        low = Batch(pos[:n], [SeqRows(st.seq, 0, n, tree.tree_bits)], "tree", scratch=self.scratch)
        h = model.forward(low, model.embed_tokens(tokens), 0, self.layer)
        if tree.spawn:
            h = torch.cat([h, self.head(h[tree.spawn_idx])])
        up = Batch(pos, [SeqRows(st.seq, 0, tree.n_rows, tree.full_bits)], "tree", scratch=self.scratch)
        return model.forward(up, h, self.layer, model.cfg.n_layers)

    def run_step(self, st: State, count: bool = False) -> list[int]:
        tree, cands = st.extra["tree"], st.extra["cands"]
        tokens = tree.node_tokens(st.tokens[-1], cands)
        h = self.forward_tree(st, tree, tokens)
        # Tree rows only, and draft() decodes the pseudo rows it needs; but when one group of
        # pseudo rows exists (root-only trees) one LM-head pass over all rows is cheaper than two.
        logits = self.model.logits(h if tree.n_rows - tree.n <= self.k else h[: tree.n])
        tok_list = tokens.tolist()
        max_drafts = max(0, self.max_context - len(st.tokens) - 1)  # never step past the context
        if self.params.greedy:
            path, bonus = greedy_walk(tree, tok_list, logits[: tree.n].argmax(-1).tolist(), max_drafts)
        else:
            path, bonus = sample_walk(tree, tok_list, logits[: tree.n], self.params, st.gen, max_drafts)
        new = [tok_list[j] for j in path[1:]] + [bonus]
        if count:
            hit = self._hits(cands, new) if st.extra["own"] else []
            self.stats.add(len(new), hit)
            step_stats.add(len(new), hit)
        st.extra["tree"], st.extra["cands"] = self.draft(st, h, logits, tree, path[-1], new)
        st.extra["own"] = st.extra["tree"] is self.tree
        st.seq.commit(self.scratch[0], self.scratch[1], path)
        return new

    def draft(
        self, st: State, h: torch.Tensor, logits: torch.Tensor, tree: Tree, node: int, new: list[int]
    ) -> tuple[Tree, torch.Tensor]:
        """The next tree and its candidates int64 [depth, R] (row d-1: depth d), from the
        pseudo rows of `node` or, if it spawned none, of its deepest spawning ancestor.
        h: the step's final rows; logits: the LM head on its first rows (maybe all of them);
        st and new (this step's tokens) are for subclasses that draft from the request."""
        group, delta = tree.source[node]
        rows = tree.pseudo_rows(group)[delta:]
        nxt = self.tree if delta == 0 else self.fallback[delta]
        if not rows:
            return nxt, torch.empty(0, self.width, dtype=torch.int64)
        if rows.stop <= logits.shape[0]:
            rl = logits[rows.start : rows.stop]
        else:  # only these k - delta pseudo rows go through the LM head (V x d each), not all
            rl = self.model.logits(h[rows.start : rows.stop])
        return nxt, torch.topk(rl, self.width, dim=-1).indices

    @staticmethod
    def _hits(cands: torch.Tensor, new: list[int]) -> list[list[bool]]:
        """Which candidate rank matched the true token at each offset whose truth is now known."""
        d = min(len(new), cands.shape[0])
        return (cands[:d] == torch.tensor(new[:d]).unsqueeze(1)).tolist()
