"""Prompt lookup decoding: drafts are the continuation of the latest earlier match of the
last n tokens (n = max_ngram .. min_ngram) in the prompt and the generated text. No
training; the draft chain is verified by the same tree step and walks as FIRP's."""

from __future__ import annotations

import torch

from firp_engine.firp.tree import Tree
from firp_engine.firp.verify import greedy_walk, sample_walk
from firp_engine.generate import State, prefill
from firp_engine.model import Batch, SeqRows
from firp_engine.sampling import SamplingParams


def lookup(tokens: list[int], max_ngram: int, min_ngram: int, n_draft: int) -> list[int]:
    """The tokens that followed the most recent earlier occurrence of the longest suffix n-gram."""
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest match first
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + n_draft]
    return []


class PLDDecoder:
    batched = False

    def __init__(
        self,
        llm,
        params: SamplingParams,
        n_draft: int = 6,
        max_ngram: int = 3,
        min_ngram: int = 1,
        tree_budget: int | None = None,
        **_: object,
    ) -> None:
        self.model, self.params = llm.model, params
        self.chunk, self.max_context = llm.prefill_chunk, llm.max_context
        self.n_draft = tree_budget - 1 if tree_budget else n_draft
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.chains = [Tree.chain(n, 0) for n in range(self.n_draft + 1)]
        cfg = self.model.cfg
        shape = (cfg.n_layers, self.n_draft + 1, cfg.n_kv_heads, cfg.head_dim)
        self.scratch = (
            torch.empty(shape, dtype=self.model.dtype),
            torch.empty(shape, dtype=self.model.dtype),
        )

    def prefill(self, st: State) -> list[int]:
        prefill(self.model, st.seq, st.tokens[:-1], self.chunk)
        return self.run_step(st)

    def step(self, states: list[State]) -> list[list[int]]:
        return [self.run_step(st) for st in states]

    def run_step(self, st: State) -> list[int]:
        max_drafts = max(0, min(self.n_draft, self.max_context - len(st.tokens) - 1))
        drafts = lookup(st.tokens, self.max_ngram, self.min_ngram, max_drafts)
        tree = self.chains[len(drafts)]
        tokens = [st.tokens[-1], *drafts]
        batch = Batch(
            st.seq.length + tree.offsets,
            [SeqRows(st.seq, 0, tree.n, tree.tree_bits)],
            "tree",
            scratch=self.scratch,
        )
        h = self.model.forward(batch, self.model.embed_tokens(torch.tensor(tokens)))
        logits = self.model.logits(h)
        if self.params.greedy:
            path, bonus = greedy_walk(tree, tokens, logits.argmax(-1).tolist(), max_drafts)
        else:
            path, bonus = sample_walk(tree, tokens, logits, self.params, st.gen, max_drafts)
        st.seq.commit(self.scratch[0], self.scratch[1], path)
        return [tokens[j] for j in path[1:]] + [bonus]
