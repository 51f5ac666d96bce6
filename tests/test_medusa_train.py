"""Medusa head training on tiny random models: the loss falls, final states, resume."""

import dataclasses

import pytest
import torch
from spec_helpers import make_llm, tiny_checkpoint

from firp_engine.baselines import medusa as M
from firp_engine.baselines import medusa_train as MT
from firp_engine.firp import train as T
from firp_engine.firp.context import ContextStore, context_pass, run_context


@pytest.fixture(scope="module")
def llm():
    return make_llm(tiny_checkpoint(vocab=97, n_layers=4, d=64, seed=0, head_scale=0.5))


def examples(n: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()
    return [(rnd(6), rnd(24)) for _ in range(n)]


def tiny_cfg(**kw) -> T.TrainConfig:
    return T.TrainConfig(layer=2, k=3, lr=3e-2, batch_positions=16, positions_per_seq=8, n_top=16,
                         warmup=2, seed=3, **kw)  # fmt: skip


def test_training_lowers_the_loss(llm):
    torch.set_num_threads(1)
    model = llm.model
    cfg = tiny_cfg(epochs=7, max_steps=40, ckpt_every=0)
    data = examples(12, llm.config.vocab_size)
    store = ContextStore(model, [cfg.layer], cfg.n_top, cfg.max_len)
    held = data[:4]  # random tokens: only what was trained on can improve

    def loss(head):
        segs = []
        for ex in held:
            ctx = store.get(ex)
            _, pos = T.candidate_positions(ctx, cfg.k, full_groups=True)
            segs.append((ctx, pos))
        with torch.no_grad():
            return MT.medusa_loss(model, head, segs, cfg)[0].item()

    head, state = T.train(model, MT.MEDUSA, data, cfg, store)
    before = loss(M.MedusaHead(llm.config.hidden_size, cfg.k))
    after = loss(head)
    print(f"\ntraining-set loss {before:.3f} -> {after:.3f} after {state.step} steps")
    assert state.step == 40 and after < 0.9 * before
    first, last = state.history[0]["loss"], sum(h["loss"] for h in state.history[-5:]) / 5
    assert last < first
    val = T.validate(model, MT.MEDUSA, head, held, cfg, store)
    assert len(val["acc"]) == 3 and 0 <= val["chain_accepted"] <= 3


def test_final_states_match_the_model(llm):
    """final_states (re-run from the cached layer-l state) == the full forward's, normed."""
    model = llm.model
    ex = examples(1, llm.config.vocab_size, seed=5)[0]
    ctx = context_pass(model, ex, [2], 8, 1024)
    hf = MT.final_states(model, ctx, 2)
    *_, x = run_context(model, torch.tensor(ex[0] + ex[1]), [2])
    ref = torch.nn.functional.rms_norm(x, (x.shape[-1],), model.norm, model.cfg.rms_eps)
    torch.testing.assert_close(hf, ref, atol=1e-5, rtol=1e-5)


def test_resume_matches_one_run(llm, tmp_path):
    torch.set_num_threads(1)
    model = llm.model
    cfg = tiny_cfg(epochs=3, max_steps=10, ckpt_every=4)
    data = examples(8, llm.config.vocab_size)
    store = ContextStore(model, [cfg.layer], cfg.n_top, cfg.max_len)
    whole, _ = T.train(model, MT.MEDUSA, data, cfg, store, ckpt_path=tmp_path / "a.pt")
    T.train(model, MT.MEDUSA, data, dataclasses.replace(cfg, max_steps=6), store, ckpt_path=tmp_path / "b.pt")
    resumed, state = T.train(model, MT.MEDUSA, data, cfg, store, ckpt_path=tmp_path / "b.pt", resume=True)
    assert state.step == 10 and len(state.history) == 10
    assert torch.equal(whole.weight, resumed.weight) and torch.equal(whole.bias, resumed.bias)
