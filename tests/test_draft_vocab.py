"""The draft vocabulary (firp/vocab.py): the order, the rows, the sub-head's logits, head
files, and lossless decoding with the pseudo rows decoding over a subset of the tokens."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from spec_helpers import (
    BACKENDS,
    assert_same_or_near_tie,
    chi2_pvalue,
    has_cpu_kernels,
    make_llm,
    random_head,
    tiny_checkpoint,
)
from test_dynamic import IDS, VARIANTS, decode, repetitive, spy
from test_firp_decode import exact_distributions, sample_firp
from test_shards import _folder, _records

from firp_engine.errors import FirpError, FirpWarning
from firp_engine.firp import vocab as vocab_mod
from firp_engine.firp.dynamic import DynamicFirpDrafter
from firp_engine.firp.head import FirpHead
from firp_engine.firp.vocab import coverage, draft_rows, token_order
from firp_engine.loading import Checkpoint
from firp_engine.sampling import SamplingParams
from firp_engine.spec.step import SpecDecoder


def tied(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint with its LM head tied to the embedding (as the default model's is)."""
    w = {k: v for k, v in ckpt.weights.items() if k != "lm_head.weight"}
    return dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, tie_embeddings=True), weights=w)


@pytest.fixture(scope="module", params=BACKENDS)
def llm(request):
    return make_llm(tied(tiny_checkpoint(vocab=97, n_layers=4, d=64, seed=0, head_scale=0.5)), request.param)


def ordered_head(llm, seed: int = 1) -> FirpHead:
    head = random_head(llm, layer=2, k=3, seed=seed)
    head.vocab_order = torch.randperm(llm.config.vocab_size, generator=torch.Generator().manual_seed(seed))
    return head


def test_token_order_counts_ties_and_range():
    assert token_order([[3, 3, 1], np.array([1, 3, 0])], 5).tolist() == [3, 1, 0, 2, 4]
    with pytest.raises(FirpError, match="outside"):
        token_order([[5]], 5)
    assert coverage(torch.tensor([3, 1, 0, 2, 4]), [[3, 3, 1, 4]], 2) == 0.75


def test_draft_rows():
    order = torch.tensor([3, 1, 0, 2, 4])
    assert draft_rows(order, 2, 5).tolist() == [1, 3]  # sorted: the sub-head's rows keep id order
    assert draft_rows(order, 0, 5) is None and draft_rows(order, 5, 5) is None
    assert draft_rows(order, None, 5) is None  # the default: off
    assert draft_rows(None, None, 5) is None  # no order: all tokens
    with pytest.raises(FirpError, match="no vocab_order"):
        draft_rows(None, 2, 5)
    with pytest.raises(FirpError, match=">= 0"):
        draft_rows(order, -1, 5)
    with pytest.raises(FirpError, match="has 5 ids"):
        draft_rows(order, 2, 7)


@torch.inference_mode()
def test_head_rows_logits_are_the_full_heads(llm):
    m = llm.model
    for n in (1, 17, 96):
        idx = torch.randperm(m.cfg.vocab_size, generator=torch.Generator().manual_seed(n))[:n].sort().values
        h = torch.randn(5, m.cfg.hidden_size, generator=torch.Generator().manual_seed(n)).to(m.dtype)
        sub, full = m.head_rows(idx)(m.final_norm(h)).float(), m.logits(h)[:, idx]
        if llm.backend.name == "cpu":  # our GEMM computes a column the same way whatever N is
            assert torch.equal(sub, full)
        else:  # torch's BLAS may block a different N differently: drafts only, so close is enough
            torch.testing.assert_close(sub, full, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not has_cpu_kernels(), reason="C++ extension not built")
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_head_rows_on_native_weights(tmp_path, qtype):
    from test_quant import write_tiny_gguf

    from firp_engine.generate import LLM
    from firp_engine.loading import load

    write_tiny_gguf(tmp_path / "m.gguf", qtype)
    m = LLM(load(tmp_path / "m.gguf", weights="native"), dtype="bf16", backend="cpu").model
    idx = torch.arange(3, m.cfg.vocab_size, 7)
    h = torch.randn(4, m.cfg.hidden_size).to(m.dtype)
    with torch.inference_mode():
        assert torch.equal(m.head_rows(idx)(m.final_norm(h)).float(), m.logits(h)[:, idx])


def test_head_file_keeps_the_order(llm, tmp_path):
    head = ordered_head(llm)
    head.save(tmp_path / "h")
    assert torch.equal(FirpHead.load(tmp_path / "h").vocab_order, head.vocab_order)
    random_head(llm, layer=2, k=3, seed=1).save(tmp_path / "plain")
    assert FirpHead.load(tmp_path / "plain").vocab_order is None


def test_vocab_command_adds_the_train_order(tmp_path):
    folder = _folder(tmp_path)
    recs = _records(7)
    folder.append("train", recs)
    folder.append("validation", _records(2, start=50))  # never counted
    FirpHead(16, 2, 1, {"fingerprint": "x"}).save(tmp_path / "h")
    vocab_mod.main([str(tmp_path / "h"), "--data", str(folder.path)])
    head = FirpHead.load(tmp_path / "h")
    assert torch.equal(head.vocab_order, token_order([r.reply for r in recs], 1000))
    meta = json.loads((tmp_path / "h.json").read_text())
    assert meta["vocab_order"]["counted_on"] == "train-split replies" and meta["fingerprint"] == "x"


@pytest.mark.parametrize("opts", VARIANTS, ids=IDS)
def test_greedy_equals_ar(llm, opts):
    head = ordered_head(llm)
    ps = repetitive(8, llm.config.vocab_size, seed=2)
    ar = llm.generate([""] * len(ps), prompt_ids=ps, max_new_tokens=64)
    out = llm.generate([""] * len(ps), prompt_ids=ps, method="firp", head=head, max_new_tokens=64,
                       tree_budget=10, pseudo_policy="all", draft_vocab=40, **opts)  # fmt: skip
    for p, a, f in zip(ps, ar, out, strict=True):
        assert f.new_tokens == a.new_tokens
        assert_same_or_near_tie(llm.model, p, f.new_ids, a.new_ids)
    assert sum(r.steps for r in out) < sum(r.steps for r in ar)  # drafts were accepted


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_firp_drafts_stay_in_the_vocab(llm, tree):
    head = ordered_head(llm)
    keep = set(head.vocab_order[:40].tolist())
    drafter = DynamicFirpDrafter(
        llm, head=head, tree_budget=10, pseudo_policy="all", tree=tree, lookup=False, draft_vocab=40
    )
    assert drafter.draft_head is not None and drafter.vocab.numel() == 40
    drafts = spy(drafter)
    decode(llm, SpecDecoder(llm, drafter), [5, 9, 13, 2], 24)
    assert all(set(d.tokens[1:]) <= keep for d in drafts) and any(len(d.tokens) > 1 for d in drafts)
    assert all(d.logit_rows == 0 for d in drafts)  # the pseudo rows skip the full LM head


def test_sampling_is_lossless_with_a_draft_vocab():
    # untied on the torch backend: the head keeps its weight, so its rows can be picked
    llm5 = make_llm(tiny_checkpoint(vocab=5, n_layers=2, d=32, seed=7, head_scale=0.25))
    head = random_head(llm5, layer=1, k=3, seed=8)
    head.vocab_order = torch.tensor([1, 3, 0, 4, 2])  # 1 and 3: the prompt's likely tokens
    params = SamplingParams(temperature=0.9, top_p=0.95)
    drafter = DynamicFirpDrafter(llm5, head=head, tree_budget=10, lookup=False, draft_vocab=3)
    assert drafter.vocab.tolist() == [0, 1, 3]
    prompt = [1, 3, 1, 3, 1]
    v = llm5.config.vocab_size
    samples, tau = sample_firp(llm5, SpecDecoder(llm5, drafter), params, prompt, range(1000))
    assert tau > 1.2
    joint, marg4 = exact_distributions(llm5.model, prompt, params)
    cells = samples[:, 0] * v * v + samples[:, 1] * v + samples[:, 2]
    assert chi2_pvalue(torch.bincount(cells, minlength=v**3), joint) > 1e-3
    assert chi2_pvalue(torch.bincount(samples[:, 3], minlength=v), marg4) > 1e-3


def test_refusals_and_the_untied_fallback(llm):
    with pytest.raises(FirpError, match="no vocab_order"):
        DynamicFirpDrafter(llm, head=random_head(llm, layer=2, k=3, seed=1), draft_vocab=10)
    assert DynamicFirpDrafter(llm, head=ordered_head(llm), draft_vocab=0).draft_head is None
    if llm.backend.name != "cpu":
        return
    untied = make_llm(tiny_checkpoint(vocab=97, n_layers=4, d=64, seed=0, head_scale=0.5), "cpu")
    with pytest.warns(FirpWarning, match="draft vocabulary off"):  # the packed head has no rows to pick
        d = DynamicFirpDrafter(untied, head=ordered_head(untied), draft_vocab=10)
    assert d.vocab is None and d.draft_head is None
