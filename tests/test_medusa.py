"""Medusa drafting through the speculative step on tiny random models: lossless greedy
(torch and cpu backends), head files, the untrained head."""

import pytest
import torch
from spec_helpers import BACKENDS, assert_same_or_near_tie, make_llm, prompts, tiny_checkpoint

from firp_engine import generate
from firp_engine.baselines import medusa as M
from firp_engine.errors import FirpError
from firp_engine.firp import head as firp_head
from firp_engine.firp.head import FirpHead


@pytest.fixture(scope="module", params=BACKENDS)
def llm(request):
    return make_llm(tiny_checkpoint(vocab=97, n_layers=4, d=64, seed=0, head_scale=0.5), request.param)


def random_head(llm, k: int = 3, seed: int = 1, noise: float = 0.5) -> M.MedusaHead:
    d = llm.config.hidden_size
    head = M.MedusaHead(d, k, {"fingerprint": llm.fingerprint})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(k, d, d, generator=g) * noise * d**-0.5)
        head.bias.copy_(torch.randn(k, d, generator=g) * noise)
    return head


class OracleMedusa(M.MedusaDrafter):
    """Drafts the known greedy continuation at rank 0 or 1 (sometimes wrong at depth 3), so
    that long accepted paths through several branches get exercised."""

    def __init__(self, llm, oracle_ref=None, **kw):
        super().__init__(llm, **kw)
        self.ref, self.calls, self.st = oracle_ref, 0, None

    def propose(self, st, last):
        self.st = st  # candidates() below needs the request
        return super().propose(st, last)

    def candidates(self, h):
        self.calls += 1
        st = self.st
        full = self.ref[tuple(st.tokens[: st.n_prompt])]
        root = len(st.tokens) - 1
        g = torch.Generator().manual_seed(self.calls)
        cands = torch.stack(
            [torch.randperm(self.model.cfg.vocab_size, generator=g)[: self.width] for _ in range(self.k)]
        )
        for d in range(1, self.k + 1):
            if root + d >= len(full) or (d == 3 and self.calls % 4 == 0):
                continue
            rank, row = (self.calls % 2 if d == 1 else 0), cands[d - 1]
            row[row == full[root + d]] = row[rank].clone()
            row[rank] = full[root + d]
        return cands


def tau(results) -> float:
    return sum(r.new_tokens - 1 for r in results) / sum(r.steps for r in results)


def test_greedy_equals_ar(llm, monkeypatch):
    monkeypatch.setitem(generate.METHODS, "oracle", f"{__name__}:OracleMedusa")
    ps = prompts(20, llm.config.vocab_size, seed=2)
    head = random_head(llm)
    ar = llm.generate([""] * len(ps), prompt_ids=ps, max_new_tokens=128)
    refs = {tuple(p): p + r.new_ids for p, r in zip(ps, ar, strict=True)}
    kw = dict(prompt_ids=ps, head=head, tree_budget=10, max_new_tokens=128)
    med = llm.generate([""] * len(ps), method="medusa", **kw)
    orc = llm.generate([""] * len(ps), method="oracle", oracle_ref=refs, **kw)
    for p, a, m, o in zip(ps, ar, med, orc, strict=True):
        assert m.new_tokens == o.new_tokens == 128
        assert_same_or_near_tie(llm.model, p, m.new_ids, a.new_ids)
        assert_same_or_near_tie(llm.model, p, o.new_ids, a.new_ids)
    print(f"\nmedusa, random head: {tau(med):.3f} tokens/step; oracle drafts: {tau(orc):.3f}")
    assert 1.0 <= tau(med) < 2.0
    assert tau(orc) > 2.5 and any(r.accepted_hist.get(4, 0) for r in orc)  # full-depth paths happened


@pytest.mark.parametrize("budget", [1, 25])
def test_greedy_other_budgets(llm, budget):
    ps = prompts(3, llm.config.vocab_size, seed=3)
    ar = llm.generate([""] * 3, prompt_ids=ps, max_new_tokens=40)
    out = llm.generate([""] * 3, prompt_ids=ps, method="medusa", head=random_head(llm), tree_budget=budget,
                       max_new_tokens=40)  # fmt: skip
    for p, a, m in zip(ps, ar, out, strict=True):
        assert_same_or_near_tie(llm.model, p, m.new_ids, a.new_ids)


def test_sampling_runs_and_is_seeded(llm):
    kw = dict(prompt_ids=[[5, 6, 7]], method="medusa", head=random_head(llm), max_new_tokens=32)
    a = llm.generate("", temperature=0.8, seed=3, **kw)[0]
    b = llm.generate("", temperature=0.8, seed=3, **kw)[0]
    assert a.new_tokens == 32 and a.new_ids == b.new_ids


def test_head_files(llm, tmp_path, monkeypatch):
    head = random_head(llm)
    head.save(tmp_path / "m", {"acc": [[0.5, 0.1], [0.3, 0.1], [0.2, 0.1]]})
    back = M.MedusaHead.load(tmp_path / "m.json", llm.fingerprint)
    assert torch.equal(back.weight, head.weight) and torch.equal(back.bias, head.bias)
    assert back.meta["kind"] == "medusa" and back.meta["acc"][0] == [0.5, 0.1] and back.k == 3
    out = llm.generate("hi", method="medusa", head=str(tmp_path / "m"), max_new_tokens=4)
    assert out[0].new_tokens == 4
    # another model's head, as an object or a file, is refused
    wrong = M.MedusaHead(llm.config.hidden_size, 3, {"fingerprint": "0123456789abcdef"})
    with pytest.raises(FirpError, match="another model"):
        M.MedusaDrafter(llm, head=wrong)
    wrong.save(tmp_path / "wrong")
    with pytest.raises(FirpError, match="another model"):
        llm.generate("hi", method="medusa", head=str(tmp_path / "wrong"), max_new_tokens=4)
    # a FIRP head is not a Medusa head
    FirpHead(llm.config.hidden_size, 3, 2, {"fingerprint": llm.fingerprint}).save(tmp_path / "f")
    with pytest.raises(FirpError, match="not 'medusa'"):
        M.MedusaDrafter(llm, head=str(tmp_path / "f"))
    # no head at all, then the shipped one is found by fingerprint and kind
    monkeypatch.setattr(firp_head, "SHIPPED_DIR", tmp_path / "shipped")
    with pytest.raises(FirpError, match="train-head"):
        M.MedusaDrafter(llm)
    head.save(tmp_path / "shipped" / "tiny-medusa")
    assert M.MedusaDrafter(llm).k == 3


def test_untrained_head_repeats_next_token(llm):
    """W = 0, b = 0: every offset's logits are the model's next-token logits (Medusa's init)."""
    head = M.MedusaHead(llm.config.hidden_size, 2)
    x = torch.randn(5, llm.config.hidden_size)
    with torch.no_grad():
        logits = M.head_logits(llm.model, head, x)
        ref = llm.model.lm_head(x).float()
    torch.testing.assert_close(logits, ref[:, None].expand(-1, 2, -1), atol=1e-5, rtol=1e-5)
