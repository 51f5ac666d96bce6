"""Dynamic FIRP trees, and hybrid drafts that merge prompt-lookup chains into them.

The static drafter (drafter.py) reuses one tree shaped by an average acceptance table.
Here each step's tree is grown from the draft's own probabilities (EAGLE-2's idea): the
accepted node's pseudo rows give, per offset i, the top-R candidates with their softmax
probabilities p_i(r), and `spec.tree.grow` keeps the `budget` nodes of largest path
probability. FIRP candidates do not branch (offset i's candidates came from one node's
pseudo rows), so any node at depth t offers the same children: offset t+1's candidates.

With `lookup` on, the n-gram continuation of the latest match of the text's suffix (prompt
lookup, baselines/pld.py) joins the same tree: the node on the lookup chain at depth t also
offers the chain's next token, with the measured acceptance rate of lookup drafts at that
depth as its probability. Rates are kept per length of the matched n-gram: a 3-gram match is
usually a copy run that holds for many tokens, a 1-gram match often a coincidence, and one
average rate would undervalue the first and overvalue the second. A token both sources
propose is one node (the larger probability), so the node budget goes to whichever source is
likelier, step by step, and one forward verifies both.

The planner (firp/budget.py) sizes the tree from an average acceptance table. A step's own
tree knows better: when its nodes are likely (a lookup chain on repetitive text, a
confident FIRP path), more of them pay for their rows. So the tree may grow past the planned
budget, by up to `extend` nodes, to the size that maximises expected tokens over expected
step cost: best-first growth adds nodes in decreasing path probability, so its first n nodes
are the best n-node tree, and the step cost of n nodes (plus their pseudo rows) comes from
this machine's cost curve. The planned budget is the floor; user-given budgets never grow.

When the lookup chain in a step's tree is expected to yield at least `skip_pseudo` tokens
(the sum of its nodes' path probabilities; default 2), the step spawns no pseudo rows: a copy
run that hot drafts the next step from its own continuation, and the rows (through layers
[l, L) and the LM head) would cost more than they add. The step after has lookup drafts only,
or, without a chain, spawns pseudo rows again.

Trees of the same shape reuse one precomputed tree (masks, positions) and, with the same
spawning set, one layout: a step grows its tree in Python over a few dozen candidates and
looks both up. (Best-first growth adds nodes in decreasing value, so the likeliest nodes,
which spawn under `top:M`, are the first M whatever the step's values.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from firp_engine.baselines.pld import lookup_match
from firp_engine.errors import FirpError
from firp_engine.firp.budget import cost_curve, step_cost
from firp_engine.firp.drafter import FirpDrafter
from firp_engine.firp.head import FirpHead
from firp_engine.firp.pseudo import PseudoLayout, spawning
from firp_engine.scheduler import State
from firp_engine.spec.step import Draft, StepOutput
from firp_engine.spec.tree import DraftTree, grow

# Prior acceptance rate of a lookup draft at depth 1, as pseudo-counts (hits, tries): measured
# rates replace it as steps accumulate. Deeper depths take the rate measured one depth up as
# their prior (same weight): a depth the tree never included would otherwise keep the prior
# forever and never be tried, which cut every lookup chain short.
LOOKUP_PRIOR = (1.0, 3.0)


TREES = ("static", "dynamic")


class DynamicFirpDrafter(FirpDrafter):
    """The `firp` method: dynamic trees with lookup drafts by default (the fastest on
    Spec-Bench, benchmarks/RESULTS.md); `tree="static"` / `lookup=False` for the others."""

    def __init__(
        self,
        llm,
        head: FirpHead | str | Path | None = None,
        tree_budget: int | None = None,
        pseudo_policy: str | None = None,
        tree: str = "dynamic",
        lookup: bool = True,
        max_ngram: int = 3,
        n_lookup: int = 6,
        extend: int | None = None,
        skip_pseudo: float = 2.0,
        draft_vocab: int | None = None,
    ) -> None:
        super().__init__(llm, head, tree_budget, pseudo_policy, draft_vocab=draft_vocab)
        if tree not in TREES:
            raise FirpError(f"unknown tree '{tree}' (choose from {', '.join(TREES)})")
        if lookup and tree == "static":
            raise FirpError("lookup drafts need tree=dynamic")
        self.dynamic, self.use_lookup = tree == "dynamic", bool(lookup)
        self.budget = self.full.tree.n  # the static tree's node count: the same budget
        self.max_ngram, self.n_lookup = max_ngram, n_lookup
        self.skip_pseudo = float(skip_pseudo)
        self.max_context = llm.max_context
        planned = tree_budget is None and pseudo_policy is None
        if extend is None:  # default: room for a whole lookup chain past the planned tree
            extend = n_lookup if planned and self.dynamic else 0
        self.max_nodes = self.budget + max(0, int(extend))
        curve = cost_curve(llm) if self.max_nodes > self.budget else {1: 1.0, 2: 1.0}
        # step cost (x a one-row forward) of an n-node tree with its pseudo rows, n = 1..max_nodes
        self.cost = [0.0] + [
            step_cost(
                curve, n, self.spawns(n) * self.k, self.share, self.head_pass if self.spawns(n) > 1 else 0.0
            )
            for n in range(1, self.max_nodes + 1)
        ]
        self.max_rows = max(self.max_rows, self.max_nodes + self.spawns(self.max_nodes) * self.k)
        self.layouts: dict[tuple, PseudoLayout] = {}
        self.trees: dict[tuple, DraftTree] = {}  # by shape: (parent, rank) per node

    def spawns(self, n: int) -> int:
        """Nodes of an n-node tree that spawn pseudo rows under the policy."""
        return n if self.policy == "all" else min(n, self.top)

    def best_size(self, values: list[float]) -> int:
        """How many of the best-first nodes (path probabilities `values`, root first) to
        keep: the planned budget, or more while expected tokens per step cost rise."""
        n0 = min(len(values), self.budget)
        tokens = 1.0 + sum(values[1:n0])  # the bonus token, plus each node's chance
        best, best_n = tokens / self.cost[n0], n0
        for n in range(n0 + 1, len(values) + 1):
            tokens += values[n - 1]
            if tokens / self.cost[n] > best:
                best, best_n = tokens / self.cost[n], n
        return best_n

    def propose(self, st: State, last: StepOutput | None) -> Draft:
        if not self.dynamic or (last is None and not self.use_lookup):
            return super().propose(st, last)
        firp: list[list[tuple[int, float]]] = []  # per offset: (token, p), likeliest first
        if last is not None:
            if self.use_lookup:
                self.count_lookup(st, last)
            rl = self.pseudo_logits(last) if last.draft.layout is not None else torch.empty(0)
            if rl.shape[0]:  # candidates, p = exp(logit - logsumexp)
                values, idx, lse = self.model.backend.call("top_lse", rl, self.width)
                probs = (values - lse[:, None]).exp()
                pairs = zip(self.token_ids(idx).tolist(), probs.tolist(), strict=True)
                firp = [list(zip(i, p, strict=True)) for i, p in pairs]
        chain, ngram = self.lookup_chain(st) if self.use_lookup else ([], 0)
        st.extra["lookup_ngram"] = ngram
        return self.grow_draft(st, firp, chain)

    def lookup_chain(self, st: State) -> tuple[list[int], int]:
        """The lookup chain and the length of the n-gram it matched (0: none)."""
        room = max(0, min(self.n_lookup, self.max_context - len(st.tokens) - 1))
        return lookup_match(st.tokens, self.max_ngram, 1, room)

    def grow_draft(self, st: State, firp: list[list[tuple[int, float]]], chain: list[int]) -> Draft:
        """Grow this step's tree from FIRP's per-offset (token, p) lists and a lookup chain
        (whose matched n-gram length is st.extra["lookup_ngram"])."""
        rates = self.lookup_rates(st, st.extra.get("lookup_ngram", 0))

        def kids(path: list[int]) -> list[tuple[int, float]]:
            t = len(path)
            out = dict(firp[t]) if t < len(firp) else {}
            if t < len(chain) and path == chain[:t]:
                tok = chain[t]
                out[tok] = max(out.get(tok, 0.0), rates[t])
            return sorted(out.items(), key=lambda kv: -kv[1])

        nodes, labels = grow(self.max_nodes, kids)
        n = self.best_size([nd.value for nd in nodes])
        nodes, labels = nodes[:n], labels[:n]  # best-first: a prefix is a tree
        shape = tuple((nd.parent, nd.rank) for nd in nodes)
        tree = self.trees.get(shape)  # a shape's masks are built once (its node values: the first step's)
        if tree is None:
            tree = self.trees[shape] = DraftTree(nodes)
        if self.skip_pseudo > 0 and chain:
            on_chain = self.chain_nodes(tree, labels, chain)
            if sum(nodes[j].value for j in on_chain) >= self.skip_pseudo:
                st.extra["lookup_nodes"] = on_chain
                return Draft(tree, [st.tokens[-1], *labels[1:]])
        spawn = spawning(tree, self.policy, self.top)
        key = (shape, tuple(spawn))
        lay = self.layouts.get(key)
        if lay is None:
            lay = self.layouts[key] = PseudoLayout(tree, self.layer, self.k, spawn)
        st.extra["lookup_nodes"] = self.chain_nodes(lay.tree, labels, chain)
        return Draft(lay.tree, [st.tokens[-1], *labels[1:]], lay, self.logit_rows(lay))

    @staticmethod
    def chain_nodes(tree: DraftTree, labels: list[int], chain: list[int]) -> list[int]:
        """Node ids of the lookup chain's tokens present in the tree, by depth."""
        out, node = [], 0
        for tok in chain:
            node = next((c for c in tree.children[node] if labels[c] == tok), -1)
            if node < 0:
                break
            out.append(node)
        return out

    def lookup_stats(self, st: State, ngram: int) -> list[list[float]]:
        """The request's lookup drafts at depth t+1 from matches of `ngram` tokens: [accepted,
        drafted], counted from zero (the prior is lookup_rates'). Per request: texts differ in
        how much they repeat, and a request's drafts must not depend on the other requests of
        its batch (seeded sampling gives the same tokens)."""
        per_ngram = st.extra.setdefault("lookup_stats", {})
        return per_ngram.setdefault(ngram, [[0.0, 0.0] for _ in range(self.n_lookup)])

    def lookup_rates(self, st: State, ngram: int) -> list[float]:
        """Acceptance rate of a lookup draft at each depth given the one above was accepted:
        measured counts over a prior of LOOKUP_PRIOR's weight, whose rate is LOOKUP_PRIOR's at
        depth 1 and the rate just computed one depth up below it."""
        prior_hits, weight = LOOKUP_PRIOR
        prior, out = prior_hits / weight, []
        for hits, tries in self.lookup_stats(st, ngram):
            prior = (hits + weight * prior) / (tries + weight)
            out.append(prior)
        return out

    def count_lookup(self, st: State, last: StepOutput) -> None:
        """Update the lookup acceptance rates with the last step's verdict on its chain."""
        accepted = set(last.path)
        stats = self.lookup_stats(st, st.extra.get("lookup_ngram", 0))  # the last chain's match
        for t, node in enumerate(st.extra.get("lookup_nodes", [])):
            stats[t][1] += 1
            if node not in accepted:
                break  # deeper chain nodes were not even tried
            stats[t][0] += 1
