"""Training Medusa-1 heads (see medusa.py): FIRP's loop and data with the Medusa module and loss."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from firp_engine import ops
from firp_engine.baselines.medusa import MedusaHead, head_logits
from firp_engine.errors import FirpError
from firp_engine.firp import train as T
from firp_engine.model import Transformer


@torch.no_grad()
def final_states(model: Transformer, ctx: T.Context, layer: int) -> torch.Tensor:
    """[T, d] final hidden states after the final norm: layers [layer, L) re-run from the
    context's h[layer] (a cached context pass keeps h at the FIRP layer, not at the top)."""
    t = ctx.length
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ops.attend(q, k, v, causal, model.scale)

    x, positions = ctx.h[layer].to(model.dtype).clone(), torch.arange(t)
    for i in range(layer, model.cfg.n_layers):
        x = model.run_layer(i, x, positions, attend)
    return model.final_norm(x)


def kl_tail(
    logits: torch.Tensor, t_ids: torch.Tensor, t_logits: torch.Tensor, t_lse: torch.Tensor
) -> torch.Tensor:
    """Per-row KL(teacher || student) over the teacher's top-n ids plus a rest-of-vocab bucket,
    as train.kl_to_teacher's 'tail' loss, from student logits [N, V] (no final norm: Medusa's
    head output goes straight into the LM head)."""
    s_lse = logits.logsumexp(-1, keepdim=True)
    s_logp = logits.gather(1, t_ids) - s_lse
    t_logp = t_logits - t_lse[:, None]
    t_p = t_logp.exp()
    kl = (t_p * (t_logp - s_logp)).sum(-1)
    s_rest = logits.scatter(1, t_ids, float("-inf")).logsumexp(-1) - s_lse[:, 0]
    t_rest = (1 - t_p.sum(-1)).clamp(min=0)
    return kl + torch.xlogy(t_rest, t_rest) - t_rest * s_rest


def medusa_loss(
    model: Transformer, head: MedusaHead, segs: list[tuple[T.Context, torch.Tensor, torch.Tensor]], weights
) -> tuple[torch.Tensor, torch.Tensor]:
    """segs: (context, positions [G], final states [T, d]). Returns (offset-weighted mean KL,
    per-offset top-1 against the teacher's argmax [k])."""
    k = head.k
    t_ids, t_logits, t_lse, valid = T.targets([(c, p) for c, p, _ in segs], k)
    x = torch.cat([hf[pos] for _, pos, hf in segs]).float()  # [G, d]
    logits = head_logits(model, head, x).reshape(-1, model.cfg.vocab_size)  # [G*k, V]
    kl = kl_tail(logits, t_ids, t_logits, t_lse).view(-1, k)
    hit = (logits.argmax(-1) == t_ids[:, 0]).float().view(-1, k)
    valid = valid.view(-1, k).float()
    n_valid = valid.sum(0)
    per_offset = (kl * valid).sum(0) / n_valid.clamp(min=1)
    w = weights * (n_valid > 0)
    return (per_offset * w).sum() / w.sum(), (hit * valid).sum(0) / n_valid.clamp(min=1)


def train_medusa(
    model: Transformer,
    examples: list[T.Example],
    cfg: T.TrainConfig,
    store: T.ContextStore,
    ckpt_path: Path | None = None,
    resume: bool = False,
    progress: bool = False,
) -> tuple[MedusaHead, T.TrainState]:
    """FIRP's loop with Medusa heads: same sequence order, positions, teacher rows, loss and
    schedule for the same cfg (cfg.layer only names the cached context layer). Checkpoints
    and --resume as train.py's."""
    if cfg.k < 1:
        raise FirpError(f"--k must be >= 1, got {cfg.k}")
    if not examples:
        raise FirpError("no training sequences")
    torch.manual_seed(cfg.seed)
    head = MedusaHead(model.cfg.hidden_size, cfg.k)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state, weights = T.TrainState(), cfg.weights()
    if resume and ckpt_path is not None and ckpt_path.is_file():
        state = T.load_checkpoint(ckpt_path, head, opt, cfg)
    per_epoch = -(-len(examples) // cfg.seqs_per_step)
    total = per_epoch * cfg.epochs
    stop = min(total, cfg.max_steps) if cfg.max_steps else total
    t0, c0 = time.monotonic(), time.process_time()
    bar = T._bar(range(state.step, stop), "train medusa", progress, total=stop, initial=state.step)
    for step in bar:
        if cfg.max_minutes and time.monotonic() - t0 > 60 * cfg.max_minutes:
            break
        epoch, j = divmod(step, per_epoch)
        picked = T.epoch_order(len(examples), cfg.seed, epoch)[
            j * cfg.seqs_per_step : (j + 1) * cfg.seqs_per_step
        ]
        segs = []
        for idx in picked:
            ctx = store.get(examples[idx], [cfg.layer])
            gen = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch * 100003 + idx)  # as train.py
            pos = T.sample_positions(ctx, cfg, gen)
            if len(pos):
                segs.append((ctx, pos, final_states(model, ctx, cfg.layer)))
        if segs:
            for g in opt.param_groups:
                g["lr"] = T.lr_at(cfg, step, total)
            with torch.enable_grad():
                loss, top1 = medusa_loss(model, head, segs, weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            state.history.append(
                {"loss": round(loss.item(), 5), "top1": [round(x, 4) for x in top1.tolist()]}
            )
            if progress:
                bar.set_postfix_str(f"loss {loss.item():.3f}")
        state.step = step + 1
        if ckpt_path is not None and cfg.ckpt_every and state.step % cfg.ckpt_every == 0:
            T.save_checkpoint(ckpt_path, head, opt, state, cfg)
    if ckpt_path is not None:
        T.save_checkpoint(ckpt_path, head, opt, state, cfg)
    state.cpu_s, state.wall_s = time.process_time() - c0, time.monotonic() - t0
    return head, state


# ---------------------------------------------------------------- validation


def rank_metrics(rank: torch.Tensor, n_ranks: int) -> dict:
    """rank int64 [N, k]: tokens put above the teacher's argmax at each offset. The figures of
    train.validate: top-1/top-5 per offset, acc[i][r] (rank r at offset i+1 given every
    earlier offset ranked < n_ranks) and the mean drafts a greedy chain keeps."""
    n, k = rank.shape
    acc, reach = [], torch.ones(n, dtype=torch.bool)
    for i in range(k):
        r = rank[reach, i]
        acc.append([round((r == j).float().mean().item(), 4) if len(r) else 0.0 for j in range(n_ranks)])
        reach &= rank[:, i] < n_ranks
    return {
        "groups": n,
        "top1": [round((rank[:, i] < 1).float().mean().item(), 4) for i in range(k)],
        "top5": [round((rank[:, i] < 5).float().mean().item(), 4) for i in range(k)],
        "acc": acc,
        "chain_accepted": round(torch.cumprod((rank == 0).float(), dim=1).sum(1).mean().item(), 4),
    }


@torch.no_grad()
def medusa_ranks(model: Transformer, head: MedusaHead, ctx: T.Context, pos: torch.Tensor, hf: torch.Tensor):
    """int64 [G, k]: rank of the teacher's argmax among each head's logits at positions pos."""
    want = T.targets([(ctx, pos)], head.k)[0][:, 0].view(-1, head.k)
    logits = head_logits(model, head, hf[pos])  # [G, k, V]
    return (logits > logits.gather(2, want[..., None])).sum(-1)


def validate_medusa(
    model: Transformer,
    head: MedusaHead,
    examples: list[T.Example],
    cfg: T.TrainConfig,
    store: T.ContextStore,
    progress: bool = False,  # train.validate's signature; held-out Medusa validation is quick
) -> dict:
    ranks = []
    for ex in examples:
        ctx = store.get(ex, [cfg.layer])
        _, pos = T.candidate_positions(ctx, head.k, full_groups=True)
        if len(pos) == 0:
            continue
        if cfg.val_positions and len(pos) > cfg.val_positions:
            pos = pos[torch.linspace(0, len(pos) - 1, cfg.val_positions).round().long()]
        ranks.append(medusa_ranks(model, head, ctx, pos, final_states(model, ctx, cfg.layer)))
    if not ranks:
        raise FirpError("no held-out sequence is long enough to validate on")
    return rank_metrics(torch.cat(ranks), cfg.acc_ranks)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="firp train-head --method medusa", description="Train Medusa-1 heads.")
    T.add_arguments(p)
    for a in p._actions:  # train.py's parser, where --layer is required for FIRP
        if a.dest == "layer":
            a.required, a.default = False, None
    args = p.parse_args(argv)
    args.argv = argv
    try:
        T.run(args, "medusa")
    except FirpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
