"""FIRP head training on a tiny random LLaMA: the loss falls, runs are deterministic and
resumable, and training sees exactly the computation inference runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from spec_helpers import StubTokenizer, make_llm

from firp_engine import ops
from firp_engine.config import ModelConfig
from firp_engine.firp import train as T
from firp_engine.firp.context import ContextStore, context_pass, run_context
from firp_engine.firp.head import FirpHead
from firp_engine.firp.objective import FIRP, distill_loss, hidden_error, kl_to_teacher, pseudo_forward
from firp_engine.loading import Checkpoint, expected_shapes
from firp_engine.model import Batch, SeqRows, Transformer

LAYER, K = 2, 3


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.set_num_threads(1)  # bit-reproducible, and light on a shared machine
    cfg = ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        max_position=128,
        tie_embeddings=True,
        rope_theta=10000.0,
    )
    g = torch.Generator().manual_seed(1)
    weights = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            weights[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            weights[name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5 * (3 if "embed" in name else 1)
    return make_llm(Checkpoint(cfg, weights, StubTokenizer(cfg.vocab_size), "tiny")).model


def examples(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        n_prompt = int(torch.randint(4, 12, (1,), generator=g))
        n_reply = int(torch.randint(10, 30, (1,), generator=g))
        out.append(
            (
                torch.randint(0, 96, (n_prompt,), generator=g).tolist(),
                torch.randint(0, 96, (n_reply,), generator=g).tolist(),
            )
        )
    return out


def cfg(**kw) -> T.TrainConfig:
    base = dict(
        layer=LAYER,
        k=K,
        lr=3e-2,
        batch_positions=16,
        positions_per_seq=8,
        n_top=16,
        warmup=2,
        seed=3,
        ckpt_every=0,
    )
    base.update(kw)
    return T.TrainConfig(**base)


def paged_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    """Every row's logits through the inference path: paged cache, prefill batch."""
    model.new_cache(num_blocks=8, block_size=16)
    seq = model.cache.new_sequence()
    seq.reserve(len(ids))
    batch = Batch(
        torch.arange(len(ids)), [SeqRows(seq, 0, len(ids))], "prefill", slots=seq.slots(0, len(ids))
    )
    with torch.no_grad():
        return model.logits(model.forward(batch, model.embed_tokens(torch.tensor(ids))))


def test_context_pass_matches_paged_forward(model):
    prompt, reply = examples(1, seed=5)[0]
    ids = prompt + reply
    want = paged_logits(model, ids)
    with torch.no_grad():
        _, ks, vs, h_final = run_context(model, torch.tensor(ids), [LAYER])
    torch.testing.assert_close(model.logits(h_final), want, atol=1e-4, rtol=1e-4)
    assert sorted(ks) == list(range(LAYER, model.cfg.n_layers))
    # the kept K/V are what inference wrote into the pages
    seq_k = ops.gather_pages(model.cache.k[LAYER], model.cache.new_sequence().page_table, 0)
    assert seq_k.shape[0] == 0
    kc = model.cache.k[LAYER].reshape(-1, *model.cache.k.shape[3:])[: len(ids)]
    torch.testing.assert_close(ks[LAYER], kc, atol=1e-5, rtol=1e-5)
    ctx = context_pass(model, (prompt, reply), [LAYER], 8, 1024)
    top = want[len(prompt) :].topk(8, dim=-1)  # teacher rows: the reply's only
    assert ctx.row0 == len(prompt)
    assert torch.equal(ctx.top_ids[:, 0], top.indices[:, 0])
    torch.testing.assert_close(ctx.top_logits, top.values, atol=1e-4, rtol=1e-4)


def test_pseudo_rows_match_inference_tree_forward(model):
    """A group at position p in training = the same rows in a paged tree forward whose
    prefix is tokens 0..p (mask: each pseudo row sees its own group's earlier rows)."""
    prompt, reply = examples(1, seed=6)[0]
    ids = prompt + reply
    head = FirpHead(model.cfg.hidden_size, K, LAYER)
    with torch.no_grad():
        head.weight.add_(0.3 * torch.randn_like(head.weight))
        head.bias.add_(0.1 * torch.randn_like(head.bias))
    ctx = context_pass(model, (prompt, reply), [LAYER], 8, 1024)
    pos = torch.tensor([3, 9, len(ids) - 2 - K])
    with torch.no_grad():
        x0, got = pseudo_forward(model, head, [(ctx, pos)])
    torch.testing.assert_close(x0, head(ctx.h[LAYER][pos]))
    for g, p in enumerate(pos.tolist()):
        model.new_cache(num_blocks=8, block_size=16)
        seq = model.cache.new_sequence()
        seq.reserve(p + 1)
        pre = Batch(torch.arange(p + 1), [SeqRows(seq, 0, p + 1)], "prefill", slots=seq.slots(0, p + 1))
        with torch.no_grad():
            model.forward(pre, model.embed_tokens(torch.tensor(ids[: p + 1])))
            seq.length = p + 1
            L = model.cfg.n_layers
            scratch = (torch.zeros(L, K, 2, 8), torch.zeros(L, K, 2, 8))
            bits = ops.pack_mask(torch.ones(K, K, dtype=torch.bool).tril())
            tree = Batch(torch.arange(p + 1, p + 1 + K), [SeqRows(seq, 0, K, bits)], "tree", scratch=scratch)
            want = model.forward(tree, head(ctx.h[LAYER][p : p + 1]), start=LAYER)
        torch.testing.assert_close(got[g * K : (g + 1) * K], want, atol=1e-4, rtol=1e-4)


def test_kl_is_the_full_vocab_kl_when_top_n_covers_the_vocab(model):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, model.cfg.hidden_size, generator=g)
    t_logits_full = 3 * torch.randn(5, model.cfg.vocab_size, generator=g)
    want = torch.nn.functional.kl_div(
        torch.log_softmax(model.logits(h), -1),
        torch.log_softmax(t_logits_full, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    for n, loss in ((model.cfg.vocab_size, "tail"), (model.cfg.vocab_size, "top"), (8, "tail")):
        top = t_logits_full.topk(n, dim=-1)
        kl, hit = kl_to_teacher(model, h, top.indices, top.values, t_logits_full.logsumexp(-1), loss)
        if n == model.cfg.vocab_size:
            torch.testing.assert_close(kl, want, atol=1e-4, rtol=1e-4)
        else:  # grouping the tail into one bucket can only lower the KL
            assert (kl <= want + 1e-5).all() and (kl > 0).all()
        assert torch.equal(hit, model.logits(h).argmax(-1) == top.indices[:, 0])


@pytest.mark.parametrize("loss", ["tail", "top"])
def test_loss_falls(model, loss):
    data = examples(4)
    c = cfg(epochs=8, loss=loss)
    head0 = FirpHead(model.cfg.hidden_size, K, LAYER)
    probe = [(context_pass(model, ex, [LAYER], c.n_top, 1024), None) for ex in data]
    probe = [(ctx, T.candidate_positions(ctx, K, False)[1]) for ctx, _ in probe]
    with torch.no_grad():
        before = distill_loss(model, head0, probe, c)[0].item()
    head, state = T.train(model, FIRP, data, c)
    with torch.no_grad():
        after = distill_loss(model, head, probe, c)[0].item()
    assert state.step == 16 and len(state.history) == 16
    assert after < 0.8 * before, (before, after)


def test_hidden_weight_adds_the_relative_state_error(model):
    """The regression variant: loss = KL + w * ||W_i h[p] - h[p+i]||^2 / ||h[p+i]||^2 (mean
    per offset over valid rows, then the offset mean), and training with it brings the
    pseudo states closer to the real ones than KL alone."""
    data = examples(4)
    probe = [(context_pass(model, ex, [LAYER], cfg().n_top, 1024), None) for ex in data]
    probe = [(ctx, T.candidate_positions(ctx, K, False)[1]) for ctx, _ in probe]
    head = FirpHead(model.cfg.hidden_size, K, LAYER)
    with torch.no_grad():
        head.weight.add_(0.1 * torch.randn_like(head.weight))
        kl_only = distill_loss(model, head, probe, cfg())[0]
        both = distill_loss(model, head, probe, cfg(hidden_weight=0.5))[0]
        per_offset: list[list[torch.Tensor]] = [[] for _ in range(K)]
        for ctx, pos in probe:  # by hand, row by row, over the rows that have a teacher
            for p in pos.tolist():
                x = head(ctx.h[LAYER][p : p + 1])
                for i in range(K):
                    if ctx.row0 <= p + i + 1 <= ctx.length - 2:
                        real = ctx.h[LAYER][p + i + 1]
                        per_offset[i].append(((x[i] - real) ** 2).sum() / (real**2).sum())
    want = sum(torch.stack(e).mean() for e in per_offset) / K
    torch.testing.assert_close(both - kl_only, 0.5 * want, atol=1e-5, rtol=1e-4)

    def state_error(h: FirpHead) -> float:
        with torch.no_grad():
            return float(hidden_error(probe, LAYER, pseudo_forward(model, h, probe)[0], K).mean())

    plain, _ = T.train(model, FIRP, data, cfg(max_steps=8))
    regressed, _ = T.train(model, FIRP, data, cfg(max_steps=8, hidden_weight=1.0))
    assert state_error(regressed) < state_error(plain)


def test_root_embedding_variant(model, tmp_path):
    """The variant adds U_i e(token at p) to each pseudo state: with U = 0 it is the plain
    head (same loss), by hand it is W_i h + b_i + U_i e, training moves U, files keep it."""
    data = examples(4)
    probe = []
    for ex in data:
        ctx = context_pass(model, ex, [LAYER], cfg().n_top, 1024)
        ctx.ids = torch.tensor(ex[0] + ex[1])  # as ContextStore.get sets them
        probe.append((ctx, T.candidate_positions(ctx, K, False)[1]))
    d = model.cfg.hidden_size
    plain, variant = FirpHead(d, K, LAYER), FirpHead(d, K, LAYER, root_embedding=True)
    with torch.no_grad():
        same = distill_loss(model, plain, probe, cfg())[0]
        torch.testing.assert_close(distill_loss(model, variant, probe, cfg(root_embedding=True))[0], same)
        variant.emb_weight.normal_(0, d**-0.5)
        ctx, pos = probe[0]
        h, e = ctx.h[LAYER][pos], model.embed_tokens(ctx.ids[pos])
        want = torch.einsum("nd,ked->nke", h, variant.weight) + variant.bias
        want = want + torch.einsum("nd,ked->nke", e, variant.emb_weight)
        torch.testing.assert_close(variant(h, e), want.reshape(-1, d), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="embeddings"):
        variant(h)
    trained, _ = T.train(model, FIRP, data, cfg(max_steps=4, root_embedding=True))
    assert trained.emb_weight is not None and trained.emb_weight.abs().sum() > 0
    trained.save(tmp_path / "h")
    back = FirpHead.load(tmp_path / "h")
    assert torch.equal(back.emb_weight, trained.emb_weight) and back.n_params() == trained.n_params()
    assert plain.emb_weight is None and "emb_weight" not in plain.state_dict()


def test_deterministic_for_a_seed(model):
    data = examples(3)
    a, sa = T.train(model, FIRP, data, cfg(max_steps=4))
    b, sb = T.train(model, FIRP, data, cfg(max_steps=4))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert sa.history == sb.history
    c, _ = T.train(model, FIRP, data, cfg(max_steps=4, seed=4))
    assert not torch.equal(a.weight, c.weight)


def test_resume_continues_to_the_same_state(model, tmp_path):
    data = examples(5)
    full, s_full = T.train(model, FIRP, data, cfg(epochs=2))  # 6 steps in all
    path = tmp_path / "ck.pt"
    T.train(model, FIRP, data, cfg(epochs=2, max_steps=4, ckpt_every=2), ckpt_path=path)  # "killed" after 4
    resumed, s_res = T.train(model, FIRP, data, cfg(epochs=2, ckpt_every=2), ckpt_path=path, resume=True)
    assert s_res.step == s_full.step == 6
    assert s_res.history == s_full.history
    assert torch.equal(resumed.weight, full.weight) and torch.equal(resumed.bias, full.bias)
    with pytest.raises(Exception, match="other settings"):
        T.train(model, FIRP, data, cfg(epochs=2, lr=1e-3), ckpt_path=path, resume=True)


def test_validate_and_save(model, tmp_path):
    data = examples(3)
    c = dataclasses.replace(cfg(), acc_ranks=4)
    head, _ = T.train(model, FIRP, data, cfg(max_steps=2))
    val = T.validate(model, FIRP, head, examples(2, seed=9), c)
    assert len(val["top1"]) == K and len(val["acc"]) == K and len(val["acc"][0]) == 4
    assert all(a <= b for a, b in zip(val["top1"], val["top5"], strict=True))
    assert abs(val["acc"][0][0] - val["top1"][0]) < 1e-3  # offset 1 is unconditional
    head.save(tmp_path / "h", {"acc": val["acc"], "fingerprint": "x"})
    back = FirpHead.load(tmp_path / "h", "x")
    assert torch.equal(back.weight, head.weight.detach()) and back.meta["acc"] == val["acc"]


def test_disk_cache_serves_every_layer_and_epoch(model, tmp_path):
    data = examples(3)
    store = ContextStore(model, [1, LAYER], 16, 1024, cache_dir=tmp_path, key="tiny")
    head, _ = T.train(model, FIRP, data, cfg(epochs=2), store=store)
    assert store.computed == 3 and store.loaded == 3  # epoch 2 reads the cache
    plain, _ = T.train(model, FIRP, data, cfg(epochs=2))
    torch.testing.assert_close(head.weight, plain.weight, atol=2e-3, rtol=0)  # fp16 K/V on disk
    other = ContextStore(model, [LAYER], 16, 1024, cache_dir=tmp_path, key="tiny")
    ctx = other.get(data[0])  # a subset of what the file holds: served from it
    assert other.loaded == 1 and 1 in ctx.h
    fresh = context_pass(model, data[0], [LAYER], 16, 1024)
    torch.testing.assert_close(ctx.k[LAYER].float(), fresh.k[LAYER], atol=1e-2, rtol=1e-3)
    assert ContextStore(model, [0], 16, 1024, cache_dir=tmp_path, key="tiny").get(data[0]).k.keys() >= {0}
