"""The generate driver on a tiny random model: per-request random streams, option checks."""

import pytest
from spec_helpers import make_llm, prompts, random_head, tiny_checkpoint

from firp_engine.errors import FirpError


@pytest.fixture(scope="module")
def llm():
    return make_llm(tiny_checkpoint(vocab=97, n_layers=4, d=64, seed=0, head_scale=0.5))


@pytest.mark.parametrize("method", ["ar", "firp", "pld"])
def test_request_in_a_batch_samples_as_alone(llm, method):
    """Request i of a batch seeded s draws from its own stream (seed s + i): the same tokens
    as the request alone with seed s + i, whoever else is in the batch."""
    ps = prompts(4, llm.config.vocab_size, seed=11)
    opts = {"head": random_head(llm, layer=2, k=3, seed=1)} if method == "firp" else {}
    kw = dict(method=method, temperature=1.0, top_p=0.9, max_new_tokens=24, **opts)
    batch = llm.generate([""] * 4, prompt_ids=ps, seed=7, **kw)
    for i in (0, 2, 3):
        alone = llm.generate("", prompt_ids=[ps[i]], seed=7 + i, **kw)[0]
        assert alone.new_ids == batch[i].new_ids
    assert len({tuple(r.new_ids) for r in batch}) == 4  # distinct streams, not one shared


def test_unknown_method_option_is_one_line(llm):
    with pytest.raises(FirpError, match="method 'pld' takes no option 'pseudo_policy'"):
        llm.generate("hi", method="pld", pseudo_policy="all", max_new_tokens=2)
    with pytest.raises(FirpError, match="method 'ar' takes no option 'tree_budget'"):
        llm.generate("hi", tree_budget=4, max_new_tokens=2)
    with pytest.raises(FirpError, match="unknown method"):
        llm.generate("hi", method="eagle", max_new_tokens=2)
