"""The firp method's trees on tiny random models: static, dynamic, and hybrid FIRP + lookup
drafts (the default). Lossless greedy (torch and cpu backends), lossless sampling, tree
growth and lookup bookkeeping."""

import pytest
import torch
from spec_helpers import (
    BACKENDS,
    assert_same_or_near_tie,
    chi2_pvalue,
    make_llm,
    prompts,
    random_head,
    tiny_checkpoint,
)
from test_firp_decode import exact_distributions, sample_firp

from firp_engine.errors import FirpError
from firp_engine.firp.dynamic import LOOKUP_PRIOR, DynamicFirpDrafter
from firp_engine.generate import State
from firp_engine.sampling import SamplingParams
from firp_engine.spec.step import SpecDecoder
from firp_engine.spec.tree import grow

VARIANTS = [{"tree": "static", "lookup": False}, {"tree": "dynamic", "lookup": False}, {}]  # {}: hybrid
IDS = ["static", "dynamic", "hybrid"]


@pytest.fixture(scope="module", params=BACKENDS)
def llm(request):
    return make_llm(tiny_checkpoint(vocab=97, n_layers=4, d=64, seed=0, head_scale=0.5), request.param)


def repetitive(n: int, vocab: int, seed: int) -> list[list[int]]:
    """Half random prompts, half repeating a phrase (so that lookups find drafts)."""
    g = torch.Generator().manual_seed(seed)
    out = prompts(n // 2, vocab, seed)
    for _ in range(n - n // 2):
        phrase = torch.randint(0, vocab, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        out.append(phrase * 3)
    return out


def spy(drafter) -> list:
    """The list every draft the drafter proposes from now on is appended to."""
    drafts, propose = [], drafter.propose
    drafter.propose = lambda st, last: drafts.append(propose(st, last)) or drafts[-1]
    return drafts


def decode(llm, dec: SpecDecoder, prompt: list[int], n_new: int) -> State:
    """Greedy-decode at least n_new tokens after prompt; the final state (its pages freed)."""
    st = State(llm.cache.new_sequence(), list(prompt), len(prompt))
    with torch.inference_mode():
        st.tokens += dec.prefill(st)
        while len(st.tokens) < len(prompt) + n_new:
            st.tokens += dec.run_step(st)
    st.seq.free()
    return st


@pytest.mark.parametrize("opts", VARIANTS, ids=IDS)
@pytest.mark.parametrize("budget,policy", [(10, "all"), (4, "top:1"), (25, "top:3")])
def test_greedy_equals_ar(llm, opts, budget, policy):
    head = random_head(llm, layer=2, k=3, seed=1)
    ps = repetitive(20 if budget == 10 else 6, llm.config.vocab_size, seed=2)
    n_new = 128 if budget == 10 else 48
    ar = llm.generate([""] * len(ps), prompt_ids=ps, max_new_tokens=n_new)
    out = llm.generate([""] * len(ps), prompt_ids=ps, method="firp", head=head, max_new_tokens=n_new,
                       tree_budget=budget, pseudo_policy=policy, **opts)  # fmt: skip
    for p, a, f in zip(ps, ar, out, strict=True):
        assert f.new_tokens == a.new_tokens
        assert_same_or_near_tie(llm.model, p, f.new_ids, a.new_ids)
    assert sum(r.steps for r in out) < sum(r.steps for r in ar)  # drafts were accepted


def test_hybrid_measures_lookup_acceptance(llm):
    """On text that repeats itself, lookup chains get tried and accepted: the request's
    measured acceptance rate climbs above the prior, so they win more of the node budget."""
    head = random_head(llm, layer=2, k=3, seed=1)
    ps = [[5, 6, 7, 8, 9, 10, 11] * 4, [3, 1, 4, 1, 5, 9, 2, 6] * 3]
    ar = llm.generate([""] * 2, prompt_ids=ps, max_new_tokens=64)
    drafter = DynamicFirpDrafter(llm, head=head, tree_budget=10)
    dec = SpecDecoder(llm, drafter)
    drafts = spy(drafter)  # every proposal, to see which steps spawned pseudo rows
    for p, a in zip(ps, ar, strict=True):
        st = decode(llm, dec, p, 64)
        assert_same_or_near_tie(llm.model, p, st.tokens[len(p) : len(p) + 64], a.new_ids)
        per_ngram = st.extra["lookup_stats"]  # {matched n-gram length: per depth [hits, tries]}
        assert set(per_ngram) <= set(range(drafter.max_ngram + 1))
        hits, tries = drafter.lookup_stats(st, drafter.max_ngram)[0]  # repeats match 3-grams
        prior_hits, prior_tries = LOOKUP_PRIOR
        assert tries > 5  # chains were drafted on most steps
        assert hits / tries > prior_hits / prior_tries
        rates = drafter.lookup_rates(st, drafter.max_ngram)
        assert rates[0] > prior_hits / prior_tries
        # depths below inherit the rate above as their prior: none is stuck at the prior
        assert min(rates) > prior_hits / prior_tries
        print(f"\nlookup depth-1 acceptance {hits / tries:.2f} (prior {prior_hits / prior_tries:.2f})")
    # hot copy runs skip the pseudo rows (skip_pseudo); other steps keep them
    assert any(d.layout is None for d in drafts) and any(d.layout is not None for d in drafts)


def test_skip_pseudo_off_always_spawns(llm):
    head = random_head(llm, layer=2, k=3, seed=1)
    p = [5, 6, 7, 8, 9, 10, 11] * 4
    drafter = DynamicFirpDrafter(llm, head=head, tree_budget=10, skip_pseudo=0)
    drafts = spy(drafter)
    decode(llm, SpecDecoder(llm, drafter), p, 32)
    assert drafts and all(d.layout is not None for d in drafts)


def test_grow_merges_sources_best_first():
    firp = [[(10, 0.5), (11, 0.3)], [(20, 0.6), (21, 0.2)]]
    chain = [11, 30, 31]

    def kids(path):
        t = len(path)
        out = dict(firp[t]) if t < len(firp) else {}
        if t < len(chain) and path == chain[:t]:
            out[chain[t]] = max(out.get(chain[t], 0.0), 0.7)
        return sorted(out.items(), key=lambda kv: -kv[1])

    nodes, labels = grow(6, kids)
    got = {tuple(labels[j] for j in path_of(nodes, i)): nodes[i].value for i in range(1, len(nodes))}
    # FIRP's 11 (0.3) and lookup's 11 (0.7) are one node worth 0.7; the chain's deeper
    # nodes (0.49, 0.343) outbid FIRP's (10, 20) (0.3) for the last places
    want = {(11,): 0.7, (10,): 0.5, (11, 30): 0.49, (11, 20): 0.42, (11, 30, 31): 0.343}
    assert got == pytest.approx(want)
    assert [n.rank for n in nodes if n.parent == 0] == [0, 1]


def path_of(nodes, j):
    out = []
    while j > 0:
        out.append(j)
        j = nodes[j].parent
    return out[::-1]


def test_options_are_checked(llm):
    head = random_head(llm, layer=2, k=3, seed=1)
    with pytest.raises(FirpError, match="unknown tree"):
        DynamicFirpDrafter(llm, head=head, tree="bushy")
    with pytest.raises(FirpError, match="lookup drafts need tree=dynamic"):
        DynamicFirpDrafter(llm, head=head, tree="static", lookup=True)


@pytest.mark.parametrize("opts", VARIANTS, ids=IDS)
def test_sampling_is_lossless(opts):
    llm5 = make_llm(tiny_checkpoint(vocab=5, n_layers=2, d=32, seed=7, head_scale=0.25))
    head = random_head(llm5, layer=1, k=3, seed=8)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    dec = SpecDecoder(llm5, DynamicFirpDrafter(llm5, head=head, tree_budget=10, **opts))
    prompt = [1, 3, 1, 3, 1]  # repeats: lookup drafts compete with FIRP's in the hybrid
    v = llm5.config.vocab_size
    samples, tau = sample_firp(llm5, dec, params, prompt, range(1000))
    assert tau > 1.3
    joint, marg4 = exact_distributions(llm5.model, prompt, params)
    cells = samples[:, 0] * v * v + samples[:, 1] * v + samples[:, 2]
    p_joint = chi2_pvalue(torch.bincount(cells, minlength=v**3), joint)
    p_marg = chi2_pvalue(torch.bincount(samples[:, 3], minlength=v), marg4)
    print(f"\n{opts}: {tau:.2f} tokens/step, chi-square p = {p_joint:.3f} (t1..t3), {p_marg:.3f} (t4)")
    assert p_joint > 1e-3 and p_marg > 1e-3


def test_layouts_are_reused(llm):
    head = random_head(llm, layer=2, k=3, seed=1)
    drafter = DynamicFirpDrafter(llm, head=head, tree_budget=8, tree="dynamic")
    llm.generate([""] * 4, prompt_ids=prompts(4, llm.config.vocab_size, 9), method="firp", head=head,
                 tree_budget=8, tree="dynamic", max_new_tokens=64)  # fmt: skip
    st = State(llm.cache.new_sequence(), [1, 2, 3], 3)
    firp = [[(t, 0.5 / (r + 1)) for r, t in enumerate(range(10, 15))] for _ in range(3)]
    a = drafter.grow_draft(st, firp, [])
    b = drafter.grow_draft(st, [[(t + 20, p) for t, p in row] for row in firp], [])
    assert a.layout is b.layout and a.tokens != b.tokens and len(drafter.layouts) == 1
    assert a.tree is b.tree and len(drafter.trees) == 1


@pytest.mark.parametrize("opts", [{}, {"lookup": False}], ids=["hybrid", "dynamic"])
def test_planned_trees_extend_and_stay_lossless(llm, opts):
    """With the planner's budget (no user budget) a tree may grow by up to `extend` nodes;
    the output is still ar's."""
    head = random_head(llm, layer=2, k=3, seed=1)
    ps = repetitive(6, llm.config.vocab_size, seed=3)
    ar = llm.generate([""] * len(ps), prompt_ids=ps, max_new_tokens=48)
    out = llm.generate([""] * len(ps), prompt_ids=ps, method="firp", head=head, max_new_tokens=48, **opts)
    for p, a, f in zip(ps, ar, out, strict=True):
        assert_same_or_near_tie(llm.model, p, f.new_ids, a.new_ids)
    d = DynamicFirpDrafter(llm, head=head, **opts)
    assert d.max_nodes == d.budget + d.n_lookup  # room for a whole lookup chain
    assert DynamicFirpDrafter(llm, head=head, tree_budget=4).max_nodes == 4  # the user's budget stays
    assert DynamicFirpDrafter(llm, head=head, extend=0).max_nodes == d.budget


def test_best_size_trades_tokens_against_step_cost(llm):
    """Keep n best-first nodes maximising (1 + sum of their path probabilities) / cost(n):
    never fewer than the planned budget; more only while the ratio rises."""
    head = random_head(llm, layer=2, k=3, seed=1)
    d = DynamicFirpDrafter(llm, head=head, tree_budget=3, pseudo_policy="top:1", extend=5)
    assert (d.budget, d.max_nodes) == (3, 8)
    values = [1.0, 0.9, 0.8, 0.7, 0.6, 0.1, 0.05, 0.01]  # a hot chain, then unlikely nodes
    d.cost = [0.0] + [1.0] * 8  # free rows: keep everything
    assert d.best_size(values) == 8
    d.cost = [0.0] + [float(n) for n in range(1, 9)]  # every node a full step: the floor
    assert d.best_size(values) == 3
    d.cost = [0.0] + [1.0 + 0.2 * n for n in range(1, 9)]  # a node = 0.2 steps: keep p > ratio
    want = max(range(3, 9), key=lambda n: (1 + sum(values[1:n])) / d.cost[n])
    assert d.best_size(values) == want == 5
    assert d.best_size(values[:2]) == 2  # fewer candidates than the budget
