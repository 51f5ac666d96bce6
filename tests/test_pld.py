"""Prompt lookup drafting through the speculative step on a tiny random model: lossless
greedy (torch and cpu backends), and its n-gram lookup."""

import pytest
import torch
from spec_helpers import BACKENDS, assert_same_or_near_tie, make_llm, tiny_checkpoint

from firp_engine.baselines.pld import lookup, lookup_match


@pytest.fixture(scope="module", params=BACKENDS)
def llm(request):
    return make_llm(tiny_checkpoint(vocab=97, n_layers=4, d=64, seed=0, head_scale=0.5), request.param)


def repetitive_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a random phrase, so that lookups find drafts to verify."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        phrase = torch.randint(0, vocab, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        out.append(phrase * int(torch.randint(2, 5, (1,), generator=g)))
    return out


def test_greedy_equals_ar(llm):
    ps = repetitive_prompts(20, llm.config.vocab_size, seed=4)
    ar = llm.generate([""] * len(ps), prompt_ids=ps, max_new_tokens=128)
    pld = llm.generate([""] * len(ps), prompt_ids=ps, method="pld", max_new_tokens=128)
    for p, a, b in zip(ps, ar, pld, strict=True):
        assert b.new_tokens == a.new_tokens
        assert_same_or_near_tie(llm.model, p, b.new_ids, a.new_ids)
    # drafts were found and kept: fewer verification steps than tokens
    assert sum(r.steps for r in pld) < sum(r.steps for r in ar)


def test_lookup_takes_the_longest_latest_match():
    toks = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(toks, max_ngram=3, min_ngram=1, n_draft=2) == [7, 8]  # "2 3" matched, latest first
    assert lookup([4, 5, 6], max_ngram=3, min_ngram=1, n_draft=2) == []


def test_lookup_match_reports_the_ngram_length():
    toks = [1, 2, 3, 7, 8, 9, 2, 3]
    assert lookup_match(toks, max_ngram=3, min_ngram=1, n_draft=2) == ([7, 8], 2)  # "2 3"
    assert lookup_match([5, 9, 5], max_ngram=3, min_ngram=1, n_draft=3) == ([9, 5], 1)
    assert lookup_match([4, 5, 6], max_ngram=3, min_ngram=1, n_draft=2) == ([], 0)
