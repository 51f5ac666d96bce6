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

Several sequences step together: their rows are packed one sequence after another in each
forward (each under its own mask, its K/V in its own region of the scratch), and the LM
head reads all of them in one pass; walking, committing and drafting are per sequence.

Prefill writes all prompt tokens but the last; the last one is the root of the first
step's tree, so the first step is no special case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from firp_engine.generate import prefill
from firp_engine.model import Batch, SeqRows
from firp_engine.scheduler import State
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
    """Speculative decoding with any drafter, batched over requests: the draft trees of all
    running sequences (with any added rows) go through one forward, packed per sequence,
    each under its own mask; verification, commit and drafting run per sequence."""

    batched = True

    def __init__(self, llm, drafter: Drafter) -> None:
        self.model, self.drafter = llm.model, drafter
        self.chunk, self.max_context = llm.prefill_chunk, llm.max_context
        self.rows = drafter.max_rows  # scratch rows per sequence
        self.overshoot = drafter.max_rows  # most tokens one step commits (for KV admission)
        self.scratch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reserve_scratch(1)

    def reserve_scratch(self, n_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V scratch [L, n_seqs * rows, Hkv, D]: sequence b's rows start at b * rows."""
        if self.scratch is None or self.scratch[0].shape[1] < n_seqs * self.rows:
            cfg, m = self.model.cfg, self.model
            shape = (cfg.n_layers, n_seqs * self.rows, cfg.n_kv_heads, cfg.head_dim)
            self.scratch = tuple(torch.empty(shape, dtype=m.dtype, device=m.device) for _ in "kv")
        return self.scratch

    def prefill(self, st: State) -> list[int]:
        prefill(self.model, st.seq, st.tokens[:-1], self.chunk)
        st.extra["last"] = None
        return self.run_step(st)

    def step(self, states: list[State]) -> list[list[int]]:
        drafts = [self.drafter.propose(st, st.extra["last"]) for st in states]
        h, spans = self.forward(states, drafts)
        # One LM-head pass over every sequence's tree rows (and the added rows it asks for).
        want = [range(a, a + max(d.tree.n, d.logit_rows)) for (a, _), d in zip(spans, drafts, strict=True)]
        logits = self.model.logits(h[torch.tensor([r for w in want for r in w], device=h.device)])
        out, at = [], 0
        for b, (st, d, (a, e)) in enumerate(zip(states, drafts, spans, strict=True)):
            lg = logits[at : at + len(want[b])]
            at += len(want[b])
            out.append(self.verify(st, d, h[a:e], lg, b * self.rows))
        return out

    def run_step(self, st: State) -> list[int]:
        return self.step([st])[0]

    def forward(self, states: list[State], drafts: list[Draft]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The step's one forward over all sequences. Returns the final hidden rows of all
        sequences packed (sequence b: tree rows, then added rows, at spans[b] = (start, end))."""
        model, dev = self.model, self.model.device
        scratch = self.reserve_scratch(len(states))
        layers = {d.layout.layer for d in drafts if d.layout is not None}
        assert len(layers) <= 1, "drafts of one step add their rows at one layer"
        layer = layers.pop() if layers else model.cfg.n_layers
        low, up, pos_low, pos_up, spans, a, u = [], [], [], [], [], 0, 0
        for b, (st, d) in enumerate(zip(states, drafts, strict=True)):
            tree, lay = d.tree, d.layout
            offsets = tree.depth if lay is None else lay.offsets
            # Rows past the RoPE table only occur for drafts past the context: never accepted.
            pos = (st.seq.length + offsets).clamp_(max=model.cos.shape[0] - 1)
            n_rows = tree.n if lay is None else lay.n_rows
            bits = tree.tree_bits if lay is None else lay.full_bits
            low.append(SeqRows(st.seq, a, a + tree.n, tree.tree_bits.to(dev), b * self.rows))
            up.append(SeqRows(st.seq, u, u + n_rows, bits.to(dev), b * self.rows))
            pos_low.append(pos[: tree.n])
            pos_up.append(pos)
            spans.append((u, u + n_rows))
            a, u = a + tree.n, u + n_rows
        x = model.embed_tokens([t for d in drafts for t in d.tokens])
        batch = Batch(torch.cat(pos_low).to(dev), low, "tree", scratch=scratch)
        h = model.forward(batch, x, 0, layer)
        if layer == model.cfg.n_layers:
            return h, spans
        parts, a = [], 0
        for d in drafts:  # each sequence's tree rows, then the rows its drafter adds
            n = d.tree.n
            parts.append(h[a : a + n])
            if d.layout is not None:
                parts.append(self.drafter.extra_rows(d, h[a : a + n]))
            a += n
        batch = Batch(torch.cat(pos_up).to(dev), up, "tree", scratch=scratch)
        return model.forward(batch, torch.cat(parts), layer, model.cfg.n_layers), spans

    def verify(
        self, st: State, d: Draft, h: torch.Tensor, logits: torch.Tensor, scratch_row: int
    ) -> list[int]:
        """Walk one sequence's tree, commit the accepted rows' K/V, keep the step's outputs."""
        tree = d.tree
        max_drafts = max(0, self.max_context - len(st.tokens) - 1)  # never step past the context
        if st.params.greedy:
            path, bonus = greedy_walk(tree, d.tokens, logits[: tree.n].argmax(-1).tolist(), max_drafts)
        else:
            path, bonus = sample_walk(tree, d.tokens, logits[: tree.n], st.params, st.gen, max_drafts)
        new = [d.tokens[j] for j in path[1:]] + [bonus]
        st.seq.commit(*self.scratch, [scratch_row + j for j in path])
        st.extra["last"] = StepOutput(d, path, new, h, logits)
        return new
