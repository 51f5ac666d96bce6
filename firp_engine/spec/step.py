"""One speculative step for every drafter: tree forward, verification, bonus token, KV commit.

A drafter (FIRP, Medusa, prompt lookup, ...) only proposes: from the request and the last
step's outputs it returns the next `Draft`, a token tree whose root is the pending token
(the last accepted one, not yet in the cache). Everything lossless lives here, once:

1. forward: the tree rows run all layers as one `Batch(kind="tree")` whose K/V land in a
   scratch buffer. A drafter may add rows of its own (`Draft.layout`, FIRP's pseudo rows):
   then layers [0, layout.layer) run on the tree rows, `drafter.extra_rows` turns their
   states into the added rows, and layers [layout.layer, L) run on all rows under the
   layout's mask. Added rows are never verified or committed; they are the drafter's.
2. verify: the LM head on the tree rows, then the greedy walk or lossless recursive
   rejection sampling (`spec/verify.py`) gives the accepted path and the bonus token.
3. commit: only the accepted nodes' K/V go from the scratch into the sequence's pages.

Prefill writes all prompt tokens but the last; the last one is the root of the first
step's tree, so the first step is no special case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from firp_engine.generate import State, prefill
from firp_engine.model import Batch, SeqRows
from firp_engine.sampling import SamplingParams
from firp_engine.spec.tree import DraftTree
from firp_engine.spec.verify import greedy_walk, sample_walk


class RowLayout(Protocol):
    """Rows a drafter adds to the forward after the n tree rows (see firp/pseudo.py)."""

    tree: DraftTree
    layer: int  # the added rows join after layers [0, layer)
    n_rows: int  # tree rows + added rows
    offsets: torch.Tensor  # int64 [n_rows]: each row's position minus the root's
    full_bits: torch.Tensor  # int64 [n_rows, W]: what each row sees among all rows, from `layer` on


@dataclass
class Draft:
    """What one step verifies: a tree and its node tokens, maybe with added rows."""

    tree: DraftTree
    tokens: list[int]  # [tree.n], the root (pending token) first
    layout: RowLayout | None = None
    logit_rows: int = 0  # rows the step's LM-head pass covers: max(tree.n, this)


@dataclass
class StepOutput:
    """What the step computed, for the drafter's next proposal."""

    draft: Draft
    path: list[int]  # accepted node ids, root first
    new: list[int]  # tokens returned: the accepted drafts, then the bonus token
    h: torch.Tensor  # final hidden rows [n_rows, d] (before the final norm)
    logits: torch.Tensor  # fp32 [draft.logit_rows or tree.n, V]


class Drafter(Protocol):
    """What a method plugs into the step. A drafter whose drafts carry a layout also has
    `extra_rows(draft, h) -> rows`: the tree rows' states at layout.layer [n, d] -> the
    added rows [n_rows - n, d] (FIRP's head projection)."""

    max_rows: int  # most rows a draft's forward has (sizes the K/V scratch)

    def propose(self, st: State, last: StepOutput | None) -> Draft:
        """The next draft; st.tokens[-1] is its root. last is None right after prefill."""
        ...


class SpecDecoder:
    """Speculative decoding with any drafter, one request at a time (trees are per sequence)."""

    batched = False

    def __init__(self, llm, params: SamplingParams, drafter: Drafter) -> None:
        self.model, self.params, self.drafter = llm.model, params, drafter
        self.chunk, self.max_context = llm.prefill_chunk, llm.max_context
        cfg = self.model.cfg
        shape = (cfg.n_layers, drafter.max_rows, cfg.n_kv_heads, cfg.head_dim)
        dev = self.model.device
        self.scratch = (
            torch.empty(shape, dtype=self.model.dtype, device=dev),
            torch.empty(shape, dtype=self.model.dtype, device=dev),
        )
        self.overshoot = drafter.max_rows  # most tokens one step commits (for KV admission)

    def prefill(self, st: State) -> list[int]:
        prefill(self.model, st.seq, st.tokens[:-1], self.chunk)
        st.extra["last"] = None
        return self.run_step(st)

    def step(self, states: list[State]) -> list[list[int]]:
        return [self.run_step(st) for st in states]

    def forward(self, st: State, draft: Draft) -> torch.Tensor:
        """The step's one forward: final hidden rows [n_rows, d] (tree rows, then added rows)."""
        model, tree, lay = self.model, draft.tree, draft.layout
        dev = model.device
        offsets = tree.depth if lay is None else lay.offsets
        # Rows past the RoPE table only occur for drafts past the context: never accepted.
        pos = (st.seq.length + offsets.to(dev)).clamp_(max=model.cos.shape[0] - 1)
        x = model.embed_tokens(torch.tensor(draft.tokens, device=dev))
        low = Batch(
            pos[: tree.n], [SeqRows(st.seq, 0, tree.n, tree.tree_bits.to(dev))], "tree", scratch=self.scratch
        )
        if lay is None:
            return model.forward(low, x)
        h = model.forward(low, x, 0, lay.layer)
        h = torch.cat([h, self.drafter.extra_rows(draft, h)])
        up = Batch(pos, [SeqRows(st.seq, 0, lay.n_rows, lay.full_bits.to(dev))], "tree", scratch=self.scratch)
        return model.forward(up, h, lay.layer, model.cfg.n_layers)

    def run_step(self, st: State) -> list[int]:
        draft = self.drafter.propose(st, st.extra["last"])
        tree = draft.tree
        h = self.forward(st, draft)
        logits = self.model.logits(h[: max(tree.n, draft.logit_rows)])
        max_drafts = max(0, self.max_context - len(st.tokens) - 1)  # never step past the context
        if self.params.greedy:
            path, bonus = greedy_walk(tree, draft.tokens, logits[: tree.n].argmax(-1).tolist(), max_drafts)
        else:
            path, bonus = sample_walk(tree, draft.tokens, logits[: tree.n], self.params, st.gen, max_drafts)
        new = [draft.tokens[j] for j in path[1:]] + [bonus]
        st.seq.commit(self.scratch[0], self.scratch[1], path)
        st.extra["last"] = StepOutput(draft, path, new, h, logits)
        return new
