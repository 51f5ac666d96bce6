"""Prompt lookup decoding: drafts are the continuation of the latest earlier match of the
last n tokens (n = max_ngram .. min_ngram) in the prompt and the generated text. No
training; the draft chain is verified by the speculative step (spec/step.py)."""

from __future__ import annotations

from firp_engine.scheduler import State
from firp_engine.spec.step import Draft, StepOutput
from firp_engine.spec.tree import DraftTree


def lookup_match(tokens: list[int], max_ngram: int, min_ngram: int, n_draft: int) -> tuple[list[int], int]:
    """(drafts, n): the tokens that followed the most recent earlier occurrence of the longest
    suffix n-gram, and that n (0 when nothing matched)."""
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest match first
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + n_draft], n
    return [], 0


def lookup(tokens: list[int], max_ngram: int, min_ngram: int, n_draft: int) -> list[int]:
    """The tokens that followed the most recent earlier occurrence of the longest suffix n-gram."""
    return lookup_match(tokens, max_ngram, min_ngram, n_draft)[0]


class PLDDrafter:
    def __init__(
        self,
        llm,
        n_draft: int = 6,
        max_ngram: int = 3,
        min_ngram: int = 1,
        tree_budget: int | None = None,
    ) -> None:
        self.max_context = llm.max_context
        self.n_draft = tree_budget - 1 if tree_budget else n_draft
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.chains = [DraftTree.chain(n) for n in range(self.n_draft + 1)]
        self.max_rows = self.n_draft + 1

    def propose(self, st: State, last: StepOutput | None) -> Draft:
        room = max(0, min(self.n_draft, self.max_context - len(st.tokens) - 1))
        drafts = lookup(st.tokens, self.max_ngram, self.min_ngram, room)
        return Draft(self.chains[len(drafts)], [st.tokens[-1], *drafts])
