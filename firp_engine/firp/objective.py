"""The FIRP head's training objective (the loop is train.py's).

1. the context pass (no grad, `context.py`): the whole model over the sequence, keeping the
   layer-l residual h, the upper layers' K/V and the teacher's top-n logits;
2. the pseudo pass (grad into the head only): for each sampled position p, the k rows
   W_i h[p] at RoPE positions p+i run through layers l..L-1. They attend to the cached
   context K/V of positions <= p (the context rows are not re-run: ~3x cheaper) and to
   the rows of their own group with offset <= their own, exactly as at inference;
3. the loss: per offset, KL(teacher || student) at the real row p+i (which predicts
   token p+i+1), see kl_to_teacher; optionally (`hidden_weight` > 0, a head variant) plus
   a regression of the pseudo state W_i h[p] onto the real layer-l residual h[p+i], the
   future hidden state FIRP's maps are meant to predict.
"""

from __future__ import annotations

import torch

from firp_engine.firp.context import Context, expand_kv
from firp_engine.firp.head import FirpHead
from firp_engine.firp.train import (
    Objective,
    Segment,
    TrainConfig,
    future_rows,
    offset_mean,
    targets,
    teacher_kl,
)
from firp_engine.model import Transformer


def group_attend(model: Transformer, segs: list[Segment], k: int, layer: int):
    """Attention for pseudo rows. Rows are grouped per sequence (segs: context and positions
    [G]), k rows per group in offset order. Row (g, i) sees context keys 0..p_g and the rows
    (g, j<=i) of its own group; scores in fp32, one softmax over both key sets."""

    def attend(i: int, q: torch.Tensor, kn: torch.Tensor, vn: torch.Tensor) -> torch.Tensor:
        # q [N, H, D], kn/vn [N, Hkv, D] with N = (sum of G) * k
        outs, row = [], 0
        n_heads, hd = q.shape[1], q.shape[2]
        own = torch.ones(k, k, dtype=torch.bool).tril()  # own[i, j]: offset i sees offset j
        for ctx, pos in segs:
            g = pos.shape[0]
            t = int(pos.max()) + 1  # keys past the last p are masked for every group
            qs = q[row : row + g * k].float().view(g, k, n_heads, hd)
            kc = expand_kv(ctx.k[i][:t], n_heads).float()  # [t, H, D]
            vc = expand_kv(ctx.v[i][:t], n_heads).float()
            kg = expand_kv(kn[row : row + g * k], n_heads).float().view(g, k, n_heads, hd)
            vg = expand_kv(vn[row : row + g * k], n_heads).float().view(g, k, n_heads, hd)
            s_ctx = torch.einsum("gihd,thd->ghit", qs, kc) * model.scale
            s_ctx = s_ctx.masked_fill((torch.arange(t) > pos[:, None]).view(g, 1, 1, t), float("-inf"))
            s_own = torch.einsum("gihd,gjhd->ghij", qs, kg) * model.scale
            s_own = s_own.masked_fill(~own, float("-inf"))
            p = torch.softmax(torch.cat([s_ctx, s_own], dim=-1), dim=-1)
            o = torch.einsum("ghit,thd->gihd", p[..., :t], vc) + torch.einsum(
                "ghij,gjhd->gihd", p[..., t:], vg
            )
            outs.append(o.reshape(g * k, n_heads, hd))
            row += g * k
        return torch.cat(outs).to(q.dtype)

    return attend


def pseudo_forward(
    model: Transformer, head: FirpHead, segs: list[Segment]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo states entering layer l, their final hidden states), both [N, d] with
    N = (sum of G) * k (grad flows into the head when autograd is on)."""
    k, layer = head.k, head.layer
    h0 = torch.cat([ctx.h[layer][pos].to(model.dtype) for ctx, pos in segs])  # [G, d]
    e0 = None
    if head.emb_weight is not None:  # the root-embedding variant: the tokens at p
        e0 = model.embed_tokens(torch.cat([ctx.ids[pos] for ctx, pos in segs]).tolist())
    x0 = head(h0, e0)  # [G * k, d]
    x = x0.clone()  # without autograd the layers run in place
    positions = torch.cat([future_rows(pos, k) for _, pos in segs])
    attend = group_attend(model, segs, k, layer)
    for i in range(layer, model.cfg.n_layers):
        x = model.run_layer(i, x, positions, attend)
    return x0, x


def hidden_error(segs: list[Segment], layer: int, x0: torch.Tensor, k: int) -> torch.Tensor:
    """[N]: ||W_i h[p] - h[p+i]||^2 / ||h[p+i]||^2, the pseudo state against the real
    layer-l residual of the token it stands for (relative: residual norms grow with depth)."""
    rows = [(ctx, future_rows(pos, k).clamp(max=ctx.length - 1)) for ctx, pos in segs]
    real = torch.cat([ctx.h[layer][r] for ctx, r in rows]).float()
    return ((x0.float() - real) ** 2).sum(-1) / (real**2).sum(-1).clamp(min=1e-6)


def kl_to_teacher(
    model: Transformer,
    h: torch.Tensor,
    t_ids: torch.Tensor,
    t_logits: torch.Tensor,
    t_lse: torch.Tensor,
    loss: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(teacher || student) and student-top-1 hit, h [N, d] final hidden states.

    'tail': train.teacher_kl, the teacher's top-n plus a rest-of-vocab bucket. Needs the
    full LM head with gradients (~+50% on a pseudo pass at l=20).
    'top': both sides renormalised over the teacher's top-n (n LM-head rows per pseudo row,
    nearly free), blind to student mass outside them; hit = argmax among the n ids."""
    x = model.final_norm(h).float()
    w = model.lm_head.weight
    if loss == "top":
        s_top = torch.einsum("nd,nvd->nv", x, w[t_ids].float())  # [N, n]
        t_logp = torch.log_softmax(t_logits, dim=-1)
        kl = (t_logp.exp() * (t_logp - torch.log_softmax(s_top, dim=-1))).sum(-1)
        return kl, s_top.argmax(-1) == 0  # the teacher's argmax is column 0
    logits = torch.nn.functional.linear(x, w.float())  # [N, V]
    return teacher_kl(logits, t_ids, t_logits, t_lse), logits.argmax(-1) == t_ids[:, 0]


def distill_loss(
    model: Transformer, head: FirpHead, segs: list[Segment], cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Offset-weighted mean KL over the pseudo rows (+ hidden_weight x the mean relative
    hidden-state error), per-offset top-1 [k]."""
    t_ids, t_logits, t_lse, valid = targets(segs, head.k)
    x0, h = pseudo_forward(model, head, segs)
    kl, hit = kl_to_teacher(model, h, t_ids, t_logits, t_lse, cfg.loss)
    if cfg.hidden_weight:
        kl = kl + cfg.hidden_weight * hidden_error(segs, head.layer, x0, head.k)
    return offset_mean(kl, hit, valid, cfg.weights())


@torch.no_grad()
def firp_ranks(
    model: Transformer, head: FirpHead, ctx: Context, pos: torch.Tensor, cfg: TrainConfig
) -> torch.Tensor:
    """int64 [G, k]: rank of the teacher's argmax under each pseudo row's full-vocab logits."""
    segs = [(ctx, pos)]
    h = pseudo_forward(model, head, segs)[1]
    want = targets(segs, head.k)[0][:, 0]  # teacher argmax [N]
    ranks = []
    for a in range(0, h.shape[0], 512):
        logits = model.logits(h[a : a + 512])
        ranks.append((logits > logits.gather(1, want[a : a + 512, None])).sum(-1))
    return torch.cat(ranks).view(-1, head.k)


FIRP = Objective(
    "firp",
    make_head=lambda model, cfg: FirpHead(
        model.cfg.hidden_size, cfg.k, cfg.layer, root_embedding=cfg.root_embedding
    ),
    loss=distill_loss,
    ranks=firp_ranks,
)
