"""FIRP drafting through the speculative step on tiny random models: lossless greedy (torch
and cpu backends), exact tree attention, exact commits, head checks, and a chi-square test
that tree rejection sampling keeps the model's distribution."""

import math

import pytest
import torch
from spec_helpers import (
    BACKENDS,
    assert_same_or_near_tie,
    chi2_pvalue,
    dense_logits,
    make_llm,
    prompts,
    random_head,
    tiny_checkpoint,
)

from firp_engine import generate
from firp_engine.errors import FirpError
from firp_engine.firp.drafter import FirpDrafter
from firp_engine.firp.head import FirpHead
from firp_engine.generate import State, prefill
from firp_engine.model import Batch, SeqRows
from firp_engine.sampling import SamplingParams, probs
from firp_engine.spec import verify
from firp_engine.spec.step import Draft, SpecDecoder


@pytest.fixture(scope="module", params=BACKENDS)
def llm(request):
    return make_llm(tiny_checkpoint(vocab=97, n_layers=4, d=64, seed=0, head_scale=0.5), request.param)


@pytest.fixture(scope="module")
def head(llm):
    return random_head(llm, layer=2, k=3, seed=1)


# ---------------------------------------------------------------- an oracle drafter


class OracleDrafter(FirpDrafter):
    """Drafts the known greedy continuation (sometimes at rank 1, sometimes cut short) so
    that long accepted paths through several branches get exercised."""

    def __init__(self, llm, oracle_ref=None, **kw):
        super().__init__(llm, **kw)
        self.ref = oracle_ref  # tuple(prompt) -> prompt + reference continuation
        self.calls = 0

    def propose(self, st, last):
        if last is None:
            return super().propose(st, last)
        self.calls += 1
        full = self.ref[tuple(st.tokens[: st.n_prompt])]
        root = len(st.tokens) - 1  # index of the tree's root in `full`
        g = torch.Generator().manual_seed(self.calls)
        vocab = self.model.cfg.vocab_size
        cands = torch.stack([torch.randperm(vocab, generator=g)[: self.width] for _ in range(self.k)])
        for d in range(1, self.k + 1):
            if root + d >= len(full) or (d == 3 and self.calls % 4 == 0):
                continue  # no truth here: every candidate is (almost surely) wrong
            rank = self.calls % 2 if d == 1 else 0
            row = cands[d - 1]
            row[row == full[root + d]] = row[rank].clone()  # keep the row's tokens distinct
            row[rank] = full[root + d]
        return self.draft(st, self.full, cands)


def tau(results) -> float:
    """Tokens per verification step (the prefill's first token is not a step's)."""
    return sum(r.new_tokens - 1 for r in results) / sum(r.steps for r in results)


@pytest.fixture()
def oracle(monkeypatch):
    monkeypatch.setitem(generate.METHODS, "oracle", f"{__name__}:OracleDrafter")


# ---------------------------------------------------------------- (a) lossless greedy


def test_greedy_equals_ar(llm, head, oracle):
    ps = prompts(20, llm.config.vocab_size, seed=2)
    ar = llm.generate([""] * len(ps), prompt_ids=ps, max_new_tokens=128)
    tree = {"tree_budget": 10, "pseudo_policy": "all"}  # every node spawns: the widest code path
    static = {"tree": "static", "lookup": False}  # FIRP's own drafts (the hybrid: test_dynamic.py)
    firp = llm.generate([""] * len(ps), prompt_ids=ps, method="firp", head=head, max_new_tokens=128,
                        **tree, **static)  # fmt: skip
    random_tau = tau(firp)
    refs = {tuple(p): p + r.new_ids for p, r in zip(ps, ar, strict=True)}
    orc = llm.generate(
        [""] * len(ps), prompt_ids=ps, method="oracle", head=head, oracle_ref=refs, max_new_tokens=128, **tree
    )
    oracle_tau = tau(orc)
    for p, a, f, o in zip(ps, ar, firp, orc, strict=True):
        assert f.new_tokens == o.new_tokens == 128
        assert_same_or_near_tie(llm.model, p, f.new_ids, a.new_ids)
        assert_same_or_near_tie(llm.model, p, o.new_ids, a.new_ids)
    print(f"\ntiny model, random head: {random_tau:.3f} tokens/step; oracle drafts: {oracle_tau:.3f}")
    assert 1.0 <= random_tau < 2.0
    assert oracle_tau > 2.5
    assert any(r.accepted_hist.get(4, 0) for r in orc)  # full-depth paths (3 drafts + bonus) happened


def test_root_embedding_head_greedy_equals_ar(llm, head):
    """The root-embedding variant (U_i e(node token) added to each pseudo state) changes the
    drafts, never the output."""
    variant = FirpHead(llm.config.hidden_size, head.k, head.layer, dict(head.meta), root_embedding=True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        variant.weight.copy_(head.weight)
        variant.bias.copy_(head.bias)
        variant.emb_weight.copy_(
            0.5 * torch.randn(variant.emb_weight.shape, generator=g) / head.weight.shape[-1] ** 0.5
        )
    ps = prompts(6, llm.config.vocab_size, seed=4)
    ar = llm.generate([""] * len(ps), prompt_ids=ps, max_new_tokens=64)
    opts = {"tree_budget": 10, "pseudo_policy": "all", "tree": "static", "lookup": False}
    plain = llm.generate([""] * len(ps), prompt_ids=ps, method="firp", head=head, max_new_tokens=64, **opts)
    firp = llm.generate([""] * len(ps), prompt_ids=ps, method="firp", head=variant, max_new_tokens=64, **opts)
    for p, a, f in zip(ps, ar, firp, strict=True):
        assert f.new_tokens == 64
        assert_same_or_near_tie(llm.model, p, f.new_ids, a.new_ids)
    # the embedding term reached the drafts: the accepted lengths differ from the plain head's
    assert [r.accepted_hist for r in firp] != [r.accepted_hist for r in plain]


@pytest.mark.parametrize(
    "opts",
    [{"pseudo_policy": "top:2"}, {"tree_budget": 1}, {"tree_budget": 25}, {}],  # {}: the default tree
)
def test_greedy_equals_ar_other_trees(llm, head, oracle, opts):
    ps = prompts(3, llm.config.vocab_size, seed=3)
    ar = llm.generate([""] * 3, prompt_ids=ps, max_new_tokens=48)
    refs = {tuple(p): p + r.new_ids for p, r in zip(ps, ar, strict=True)}
    for method, extra in [("firp", {}), ("oracle", {"oracle_ref": refs})]:
        out = llm.generate(
            [""] * 3, prompt_ids=ps, method=method, head=head, max_new_tokens=48, **opts, **extra
        )
        for p, a, f in zip(ps, ar, out, strict=True):
            assert_same_or_near_tie(llm.model, p, f.new_ids, a.new_ids)


def test_stops_at_context_like_ar(llm, head, oracle):
    ps = prompts(2, llm.config.vocab_size, seed=4)
    old = llm.max_context
    llm.max_context = 40
    try:
        ar = llm.generate(["", ""], prompt_ids=ps, max_new_tokens=100)
        refs = {tuple(p): p + r.new_ids for p, r in zip(ps, ar, strict=True)}
        orc = llm.generate(
            ["", ""], prompt_ids=ps, method="oracle", head=head, oracle_ref=refs, max_new_tokens=100
        )
    finally:
        llm.max_context = old
    for a, o in zip(ar, orc, strict=True):
        assert a.finish_reason == o.finish_reason == "context"
        assert o.new_ids == a.new_ids


def test_one_token_prompt(llm, head):
    ar = llm.generate("", prompt_ids=[[5]], max_new_tokens=16)[0]
    firp = llm.generate("", prompt_ids=[[5]], method="firp", head=head, max_new_tokens=16)[0]
    assert_same_or_near_tie(llm.model, [5], firp.new_ids, ar.new_ids)


# ---------------------------------------------------------------- (b) tree attention


@torch.inference_mode()
def tree_state(llm, prompt: list[int]) -> State:
    seq = llm.cache.new_sequence()
    prefill(llm.model, seq, prompt[:-1], 64)
    return State(seq, list(prompt), len(prompt))


@pytest.mark.parametrize("policy", ["all", "top:3"])
def test_tree_forward_equals_dense_paths(llm, head, policy):
    drafter = FirpDrafter(llm, head=head, tree_budget=12, pseudo_policy=policy)
    dec, lay = SpecDecoder(llm, drafter), drafter.full
    tree = lay.tree
    prompt = prompts(1, llm.config.vocab_size, seed=5)[0]
    st = tree_state(llm, prompt)
    tokens = tree.node_tokens(prompt[-1], torch.randint(0, llm.config.vocab_size, (3, drafter.width)))
    with torch.inference_mode():
        h = dec.forward([st], [Draft(tree, tokens.tolist(), lay)])[0]
        logits = llm.model.logits(h)
    st.seq.free()
    for j in range(tree.n):
        ids = prompt[:-1] + tokens[tree.path(j)].tolist()
        ref = dense_logits(llm.model, ids, head)
        torch.testing.assert_close(logits[j], ref[len(ids) - 1], atol=1e-4, rtol=1e-4)
        if j in lay.spawn:
            rows = list(lay.pseudo_rows(lay.spawn.index(j)))
            torch.testing.assert_close(logits[rows], ref[len(ids) :], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- (c) commit


def test_commit_matches_one_by_one_decoding(llm, head):
    drafter = FirpDrafter(llm, head=head, tree_budget=10)
    dec, lay = SpecDecoder(llm, drafter), drafter.full
    tree = lay.tree
    path = max(tree.paths, key=lambda p: (len(p), p[1]))  # deepest path, through a rank > 0 branch
    assert len(path) == 4 and tree.nodes[path[1]].rank > 0
    prompt = prompts(1, llm.config.vocab_size, seed=6)[0]
    st = tree_state(llm, prompt)
    tokens = tree.node_tokens(prompt[-1], torch.randint(0, llm.config.vocab_size, (3, drafter.width)))
    with torch.inference_mode():
        dec.forward([st], [Draft(tree, tokens.tolist(), lay)])
        st.seq.commit(dec.scratch[0], dec.scratch[1], path)
        # the same tokens decoded one at a time into another sequence
        ref = tree_state(llm, prompt)
        for t in tokens[path].tolist():
            s = ref.seq
            s.reserve(s.length + 1)
            batch = Batch(torch.tensor([s.length]), [SeqRows(s, 0, 1)], "decode", slots=s.slots(s.length, 1))
            llm.model.forward(batch, llm.model.embed_tokens(torch.tensor([t])))
            s.length += 1
    n = len(prompt) - 1 + len(path)
    assert st.seq.length == ref.seq.length == n
    cache = llm.cache
    for big in (cache.k, cache.v):
        flat = big.view(big.shape[0], -1, *big.shape[3:])
        ours, theirs = flat[:, st.seq.slots(0, n)], flat[:, ref.seq.slots(0, n)]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    st.seq.free()
    ref.seq.free()


# ---------------------------------------------------------------- (d) heads


def test_head_checks(llm, head, tmp_path):
    wrong = FirpHead(llm.config.hidden_size, 3, 2, {"fingerprint": "0123456789abcdef"})
    with pytest.raises(FirpError, match="another model"):
        FirpDrafter(llm, head=wrong)
    wrong.save(tmp_path / "wrong")
    with pytest.raises(FirpError, match="another model"):
        llm.generate("hi", method="firp", head=str(tmp_path / "wrong"), max_new_tokens=4)
    head.save(tmp_path / "right")
    out = llm.generate("hi", method="firp", head=str(tmp_path / "right"), max_new_tokens=4)
    assert out[0].new_tokens == 4
    assert llm.head_path is None
    with pytest.raises(FirpError, match="train-head"):
        FirpDrafter(llm)
    bad_layer = FirpHead(llm.config.hidden_size, 3, llm.config.n_layers, {"fingerprint": llm.fingerprint})
    with pytest.raises(FirpError, match="does not fit"):
        FirpDrafter(llm, head=bad_layer)


# ---------------------------------------------------------------- (e) lossless sampling


def test_try_children_is_exact(monkeypatch):
    """The acceptance rule alone: output frequencies vs p for drafts incl. a repeated one."""
    p = torch.tensor([0.05, 0.30, 0.25, 0.02, 0.18, 0.20])
    cands = [1, 2, 2, 5]

    def draw_counts(n: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        counts = torch.zeros(6, dtype=torch.int64)
        for _ in range(n):
            i, rej = verify.try_children(p, cands, gen)
            counts[cands[i] if i is not None else verify.residual_sample(p, rej, gen)] += 1
        return counts

    assert chi2_pvalue(draw_counts(3000), p) > 1e-3
    monkeypatch.setattr(verify, "accept_prob", lambda q, mass: q)  # forgets to renormalise
    assert chi2_pvalue(draw_counts(3000), p) < 1e-6


N_NEW = 4  # tokens compared per sample: t1 from the root step, t2.. from tree verification


def sample_firp(
    llm, dec: SpecDecoder, params: SamplingParams, prompt: list[int], seeds: range
) -> tuple[torch.Tensor, float]:
    """(int64 [len(seeds), N_NEW]: the first tokens of one sampled generation per seed,
    tokens per verification step)."""
    seq = llm.cache.new_sequence()
    out, steps, tokens = [], 0, 0
    with torch.inference_mode():
        prefill(llm.model, seq, prompt[:-1], 64)
        for s in seeds:
            seq.truncate(len(prompt) - 1)
            st = State(seq, list(prompt), len(prompt), torch.Generator().manual_seed(s), params)
            st.extra["last"] = None  # the state right after prefill
            st.tokens += dec.run_step(st)
            while len(st.tokens) < len(prompt) + N_NEW:
                new = dec.step([st])[0]
                st.tokens += new
                steps, tokens = steps + 1, tokens + len(new)
            out.append(st.tokens[len(prompt) : len(prompt) + N_NEW])
    seq.free()
    return torch.tensor(out), tokens / steps


@torch.no_grad()
def exact_distributions(model, prompt, params) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own joint of (t1, t2, t3) [V^3] and marginal of t4 [V]."""
    v = model.cfg.vocab_size

    def nxt(prefix: tuple) -> torch.Tensor:
        return probs(dense_logits(model, prompt + list(prefix))[-1:], params)[0].double()

    joint = torch.zeros(v, v, v, dtype=torch.float64)
    marg4 = torch.zeros(v, dtype=torch.float64)
    p1 = nxt(())
    for a in range(v):
        p2 = nxt((a,))
        for b in range(v):
            p3 = nxt((a, b))
            for c in range(v):
                joint[a, b, c] = p1[a] * p2[b] * p3[c]
                if joint[a, b, c] > 0:
                    marg4 += joint[a, b, c] * nxt((a, b, c))
    return joint.flatten(), marg4


def test_sampling_is_lossless(monkeypatch):
    llm5 = make_llm(tiny_checkpoint(vocab=5, n_layers=2, d=32, seed=7, head_scale=0.25))
    head = random_head(llm5, layer=1, k=3, seed=8)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    dec = SpecDecoder(llm5, FirpDrafter(llm5, head=head, tree_budget=10))
    prompt = [1, 3, 0, 2]
    v = llm5.config.vocab_size

    def pvalues(samples: torch.Tensor, joint: torch.Tensor, marg4: torch.Tensor) -> tuple[float, float]:
        cells = samples[:, 0] * v * v + samples[:, 1] * v + samples[:, 2]
        return (
            chi2_pvalue(torch.bincount(cells, minlength=v**3), joint),
            chi2_pvalue(torch.bincount(samples[:, 3], minlength=v), marg4),
        )

    exact = exact_distributions(llm5.model, prompt, params)
    good, tau = sample_firp(llm5, dec, params, prompt, range(1000))
    assert tau > 1.3  # the tree really accepted drafts, so the rejection sampler was exercised
    p_joint, p_marg = pvalues(good, *exact)
    print(f"\nsampling: {tau:.2f} tokens/step, chi-square p = {p_joint:.3f} (t1..t3), {p_marg:.3f} (t4)")
    assert p_joint > 1e-3 and p_marg > 1e-3
    # Negative controls. The same samples against a slightly hotter model are rejected ...
    hotter = exact_distributions(llm5.model, prompt, SamplingParams(temperature=1.1, top_p=0.95))
    assert pvalues(good, *hotter)[0] < 1e-6
    # ... and so is a lossy acceptance rule (no renormalisation after a rejected sibling).
    monkeypatch.setattr(verify, "accept_prob", lambda q, mass: q)
    bad, _ = sample_firp(llm5, dec, params, prompt, range(700))
    assert min(pvalues(bad, *exact)) < 1e-6


def test_chi2_pvalue_sanity():
    p = torch.full((10,), 0.1)
    assert math.isclose(chi2_pvalue(torch.full((10,), 100), p), 1.0)
    assert chi2_pvalue(torch.tensor([190] + [90] * 9), p) < 1e-6
