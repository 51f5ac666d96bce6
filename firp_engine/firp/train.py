"""Training the FIRP head by self-distillation, with the backbone frozen.

One example is one sequence (a prompt and the model's own greedy reply). Per sequence:

1. the context pass (no grad, `context.py`): the whole model over the sequence, keeping the
   layer-l residual h, the upper layers' K/V and the teacher's top-n logits, cached on disk;
2. the pseudo pass (grad into the head only): for a sample of positions p, the k rows
   W_i h[p] at RoPE positions p+i run through layers l..L-1. They attend to the cached
   context K/V of positions <= p (the context rows are not re-run: ~3x cheaper) and to
   the rows of their own group with offset <= their own, exactly as at inference;
3. the loss: per offset, KL(teacher || student) at the real row p+i (which predicts
   token p+i+1) over the teacher's top-n ids plus one bucket for the rest of the vocab
   (see kl_to_teacher for why the bucket matters).

Everything random is a function of (seed, epoch, sequence index), so a run resumed from
a checkpoint (head, optimizer, step) continues exactly as an uninterrupted one would.

    firp train-head --layer 10 --k 3 --samples 600 --epochs 1 --out runs/h10k3
    python -m firp_engine.firp.train --layer 10 --k 3 ...
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from firp_engine.errors import FirpError

# context_pass and run_context are re-exported: Medusa, the analyses and tests use them as T.*
from firp_engine.firp.context import (  # noqa: F401
    Context,
    ContextStore,
    Example,
    context_pass,
    expand_kv,
    run_context,
)
from firp_engine.firp.head import FirpHead
from firp_engine.model import Transformer


@dataclass
class TrainConfig:
    layer: int
    k: int
    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0  # decay would pull the maps towards 0, away from their identity start
    batch_positions: int = 128  # groups (positions p) per optimizer step
    positions_per_seq: int = 64  # groups sampled from one sequence
    prompt_frac: float = 0.0  # share of the sampled positions taken from the prompt
    n_top: int = 64  # teacher ids the KL runs over
    loss: str = "tail"  # 'tail' (top-n + a rest-of-vocab bucket) or 'top' (renormalised top-n)
    offset_weights: list[float] = field(default_factory=list)  # [] = all 1
    max_len: int = 1024  # longer sequences are cut (attention memory)
    warmup: int = 20
    seed: int = 0
    max_steps: int = 0  # stop after this many steps in all (0 = run every epoch)
    max_minutes: float = 0.0  # stop training after this much wall time (0 = no limit)
    ckpt_every: int = 50
    val_positions: int = 0  # groups per held-out sequence (0 = every position)
    acc_ranks: int = 8  # ranks kept in the acceptance table acc[i][r]

    @property
    def seqs_per_step(self) -> int:
        return max(1, self.batch_positions // self.positions_per_seq)

    def weights(self) -> torch.Tensor:
        w = self.offset_weights or [1.0] * self.k
        if len(w) != self.k:
            raise FirpError(f"--offset-weights needs {self.k} values, got {len(w)}")
        return torch.tensor(w, dtype=torch.float32)


# ---------------------------------------------------------------- the pseudo pass


def candidate_positions(ctx: Context, k: int, full_groups: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions p that can spawn a group, split into (prompt part, reply part).

    Row T-1's teacher predicts past the data's end, so targets stop at row T-2; with
    full_groups every offset of a group has a target, else at least offset 1 does."""
    last = ctx.length - 2 - (k - 1 if full_groups else 0)  # largest usable p
    start = max(ctx.n_prompt - 1, ctx.row0 - 1, 0)  # p = last prompt token drafts the first reply tokens
    # prompt positions only where the teacher rows they target were kept (row0)
    return torch.arange(max(ctx.row0 - 1, 0), min(start, last + 1)), torch.arange(start, last + 1)


def sample_positions(ctx: Context, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Up to positions_per_seq positions, about prompt_frac of them from the prompt."""
    prompt_pos, reply_pos = candidate_positions(ctx, cfg.k, full_groups=False)
    n = cfg.positions_per_seq
    n_prompt = min(len(prompt_pos), round(n * cfg.prompt_frac))
    n_reply = min(len(reply_pos), n - n_prompt)
    n_prompt = min(len(prompt_pos), n - n_reply)  # short reply: fill up from the prompt
    pick_p = prompt_pos[torch.randperm(len(prompt_pos), generator=gen)[:n_prompt]]
    pick_r = reply_pos[torch.randperm(len(reply_pos), generator=gen)[:n_reply]]
    return torch.cat([pick_p, pick_r]).sort().values


def group_attend(model: Transformer, segs: list[tuple[Context, torch.Tensor]], k: int, layer: int):
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
    model: Transformer, head: FirpHead, segs: list[tuple[Context, torch.Tensor]]
) -> torch.Tensor:
    """Final hidden states of every pseudo row, [N, d] with N = (sum of G) * k (grad flows
    into the head when autograd is on)."""
    k, layer = head.k, head.layer
    h0 = torch.cat([ctx.h[layer][pos].to(model.dtype) for ctx, pos in segs])  # [G, d]
    x = head(h0)  # [G * k, d]
    offsets = torch.arange(1, k + 1)
    positions = torch.cat([(pos[:, None] + offsets).reshape(-1) for _, pos in segs])
    attend = group_attend(model, segs, k, layer)
    for i in range(layer, model.cfg.n_layers):
        x = model.run_layer(i, x, positions, attend)
    return x


def targets(
    segs: list[tuple[Context, torch.Tensor]], k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher rows p+i for every pseudo row: top ids [N, n], top logits [N, n], full
    log-sum-exp [N], valid bool [N]."""
    ids, logits, lse, valid = [], [], [], []
    for ctx, pos in segs:
        rows = (pos[:, None] + torch.arange(1, k + 1)).reshape(-1)
        ok = (rows <= ctx.length - 2) & (rows >= ctx.row0)
        rows = (rows.clamp(max=ctx.length - 1) - ctx.row0).clamp(min=0)
        ids.append(ctx.top_ids[rows])
        logits.append(ctx.top_logits[rows])
        lse.append(ctx.lse[rows])
        valid.append(ok)
    return torch.cat(ids), torch.cat(logits), torch.cat(lse), torch.cat(valid)


def kl_to_teacher(
    model: Transformer,
    h: torch.Tensor,
    t_ids: torch.Tensor,
    t_logits: torch.Tensor,
    t_lse: torch.Tensor,
    loss: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(teacher || student) and student-top-1 hit, h [N, d] final hidden states.

    'tail': the teacher's top-n ids plus one bucket for the rest of the vocab, with true
    (full-softmax) probabilities on both sides: mass the student puts outside the teacher's
    top-n is penalised, so its full-vocab argmax is what the loss trains. Needs the full
    LM head with gradients (~+50% on a pseudo pass at l=20).
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
    s_lse = logits.logsumexp(-1, keepdim=True)
    s_logp = logits.gather(1, t_ids) - s_lse  # [N, n]
    t_logp = t_logits - t_lse[:, None]
    t_p = t_logp.exp()
    kl = (t_p * (t_logp - s_logp)).sum(-1)
    if t_ids.shape[1] < logits.shape[1]:  # the rest-of-vocab bucket
        s_rest = logits.scatter(1, t_ids, float("-inf")).logsumexp(-1) - s_lse[:, 0]  # log q(rest) [N]
        t_rest = (1 - t_p.sum(-1)).clamp(min=0)
        kl = kl + torch.xlogy(t_rest, t_rest) - t_rest * s_rest
    return kl, logits.argmax(-1) == t_ids[:, 0]


def distill_loss(
    model: Transformer,
    head: FirpHead,
    segs: list[tuple[Context, torch.Tensor]],
    weights: torch.Tensor,
    loss: str = "tail",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offset-weighted mean KL (see kl_to_teacher). Returns (loss, per-offset top-1 [k],
    per-offset valid rows [k])."""
    k = head.k
    t_ids, t_logits, t_lse, valid = targets(segs, k)
    kl, hit = kl_to_teacher(model, pseudo_forward(model, head, segs), t_ids, t_logits, t_lse, loss)
    kl, hit, valid = kl.view(-1, k), hit.view(-1, k).float(), valid.view(-1, k).float()
    n_valid = valid.sum(0)  # [k]
    per_offset = (kl * valid).sum(0) / n_valid.clamp(min=1)
    w = weights * (n_valid > 0)
    total = (per_offset * w).sum() / w.sum()
    return total, (hit * valid).sum(0) / n_valid.clamp(min=1), n_valid


# ---------------------------------------------------------------- validation


@torch.no_grad()
def validate(
    model: Transformer,
    head: FirpHead,
    examples: list[Example],
    cfg: TrainConfig,
    store: ContextStore | None = None,
    progress: bool = False,
) -> dict:
    """Full-vocab metrics on held-out sequences, against the teacher's greedy token.

    rank[i] = how many tokens the student puts above the teacher's token at offset i+1.
    acc[i][r] = P(rank at offset i+1 == r | the teacher's tokens at offsets 1..i all rank
    < acc_ranks): what a tree builder multiplies along a path of candidates."""
    k, n_ranks = head.k, cfg.acc_ranks
    store = store or ContextStore(model, [head.layer], 1, cfg.max_len)
    ranks = []
    for ex in _bar(examples, "validate", progress):
        ctx = store.get(ex, [head.layer])
        _, pos = candidate_positions(ctx, k, full_groups=True)
        if len(pos) == 0:
            continue
        if cfg.val_positions and len(pos) > cfg.val_positions:
            pos = pos[torch.linspace(0, len(pos) - 1, cfg.val_positions).round().long()]
        segs = [(ctx, pos)]
        h = pseudo_forward(model, head, segs)
        want = targets(segs, k)[0][:, 0]  # teacher argmax [N]
        for a in range(0, h.shape[0], 512):
            logits = model.logits(h[a : a + 512])
            own = logits.gather(1, want[a : a + 512, None])
            ranks.append((logits > own).sum(-1))
    if not ranks:
        raise FirpError("no held-out sequence is long enough to validate on")
    rank = torch.cat(ranks).view(-1, k)
    n = rank.shape[0]
    top1 = [(rank[:, i] < 1).float().mean().item() for i in range(k)]
    top5 = [(rank[:, i] < 5).float().mean().item() for i in range(k)]
    acc, reach = [], torch.ones(n, dtype=torch.bool)
    for i in range(k):
        r = rank[reach, i]
        acc.append([(r == j).float().mean().item() if len(r) else 0.0 for j in range(n_ranks)])
        reach &= rank[:, i] < n_ranks
    chain = torch.cumprod((rank == 0).float(), dim=1).sum(1).mean().item()
    return {
        "groups": n,
        "top1": [round(x, 4) for x in top1],
        "top5": [round(x, 4) for x in top5],
        "acc": [[round(x, 4) for x in row] for row in acc],
        "chain_accepted": round(chain, 4),  # mean drafted tokens a greedy chain keeps (bonus excluded)
    }


# ---------------------------------------------------------------- the loop


def _bar(it, desc: str, on: bool, total: int | None = None, initial: int = 0):
    if not on:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, initial=initial, dynamic_ncols=True, file=sys.stderr)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return order


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warmup, then cosine down to a tenth."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per step: loss, top1 per offset
    cpu_s: float = 0.0  # this run's process CPU time in train(), context passes included
    wall_s: float = 0.0


def save_checkpoint(
    path: Path, head: FirpHead, opt: torch.optim.Optimizer, state: TrainState, cfg: TrainConfig
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "head": head.state_dict(),
            "opt": opt.state_dict(),
            "step": state.step,
            "history": state.history,
            "torch_rng": torch.get_rng_state(),
            "config": asdict(cfg),
        },
        tmp,
    )
    tmp.replace(path)  # a run killed mid-save keeps the previous checkpoint


def load_checkpoint(path: Path, head: FirpHead, opt: torch.optim.Optimizer, cfg: TrainConfig) -> TrainState:
    ck = torch.load(path, weights_only=False)
    saved = {k: v for k, v in ck["config"].items() if k not in ("max_steps", "max_minutes", "ckpt_every")}
    now = {k: v for k, v in asdict(cfg).items() if k in saved}
    diff = [k for k in saved if saved[k] != now.get(k)]
    if diff:
        raise FirpError(f"--resume: {path} was made with other settings ({', '.join(diff)})")
    head.load_state_dict(ck["head"])
    opt.load_state_dict(ck["opt"])
    torch.set_rng_state(ck["torch_rng"])
    return TrainState(ck["step"], ck["history"])


def train(
    model: Transformer,
    examples: list[Example],
    cfg: TrainConfig,
    store: ContextStore | None = None,
    ckpt_path: Path | None = None,
    resume: bool = False,
    progress: bool = False,
) -> tuple[FirpHead, TrainState]:
    """Train a fresh head (or continue the one in ckpt_path) on `examples`."""
    if not 0 < cfg.layer < model.cfg.n_layers:
        raise FirpError(f"--layer must be in 1..{model.cfg.n_layers - 1}, got {cfg.layer}")
    if cfg.k < 1:
        raise FirpError(f"--k must be >= 1, got {cfg.k}")
    if not examples:
        raise FirpError("no training sequences")
    torch.manual_seed(cfg.seed)
    head = FirpHead(model.cfg.hidden_size, cfg.k, cfg.layer)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = TrainState()
    if resume and ckpt_path is not None and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, head, opt, cfg)
    store = store or ContextStore(model, [cfg.layer], cfg.n_top, cfg.max_len, cfg.prompt_frac > 0)
    weights = cfg.weights()
    per_epoch = math.ceil(len(examples) / cfg.seqs_per_step)
    total = per_epoch * cfg.epochs
    stop = min(total, cfg.max_steps) if cfg.max_steps else total
    t0, c0 = time.monotonic(), time.process_time()
    bar = _bar(range(state.step, stop), "train", progress, total=stop, initial=state.step)
    for step in bar:
        if cfg.max_minutes and time.monotonic() - t0 > 60 * cfg.max_minutes:
            break
        epoch, j = divmod(step, per_epoch)
        order = epoch_order(len(examples), cfg.seed, epoch)
        picked = order[j * cfg.seqs_per_step : (j + 1) * cfg.seqs_per_step]
        segs = []
        for idx in picked:
            ctx = store.get(examples[idx], [cfg.layer])
            gen = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch * 100003 + idx)
            pos = sample_positions(ctx, cfg, gen)
            if len(pos):
                segs.append((ctx, pos))
        if segs:
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step, total)
            with torch.enable_grad():
                loss, top1, _ = distill_loss(model, head, segs, weights, cfg.loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            state.history.append(
                {"loss": round(loss.item(), 5), "top1": [round(x, 4) for x in top1.tolist()]}
            )
        state.step = step + 1
        if progress and state.history:
            recent = state.history[-20:]
            mean1 = [sum(h["top1"][i] for h in recent) / len(recent) for i in range(cfg.k)]
            bar.set_postfix_str(
                f"loss {sum(h['loss'] for h in recent) / len(recent):.3f} top1 "
                + "/".join(f"{100 * x:.0f}" for x in mean1)
            )
        if ckpt_path is not None and cfg.ckpt_every and state.step % cfg.ckpt_every == 0:
            save_checkpoint(ckpt_path, head, opt, state, cfg)
    if ckpt_path is not None:
        save_checkpoint(ckpt_path, head, opt, state, cfg)
    state.cpu_s, state.wall_s = time.process_time() - c0, time.monotonic() - t0
    return head, state


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(layer=0, k=0)
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--layer", type=int, required=True, help="pseudo rows enter after this many layers")
    p.add_argument("--k", type=int, required=True, help="future offsets predicted")
    p.add_argument("--samples", type=int, default=0, help="training sequences (0 = all)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--out", required=True, help="head path, without suffix (.safetensors + .json)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup, help="steps of linear warmup (then cosine)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-positions", type=int, default=d.batch_positions, help="groups per step")
    p.add_argument("--positions-per-seq", type=int, default=d.positions_per_seq)
    p.add_argument("--prompt-frac", type=float, default=d.prompt_frac)
    p.add_argument("--offset-weights", default="", help="comma-separated loss weight per offset")
    p.add_argument("--n-top", type=int, default=d.n_top, help="teacher ids in the KL")
    p.add_argument(
        "--loss", default=d.loss, choices=["tail", "top"], help="KL over top-n + tail, or renormalised top-n"
    )
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--val", type=int, default=64, help="held-out sequences to validate on (0 = skip)")
    p.add_argument("--val-positions", type=int, default=d.val_positions, help="groups per held-out sequence")
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=0.0, help="training time limit")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--run-dir", default=None, help="checkpoints (default: runs/<name of --out>)")
    p.add_argument(
        "--cache-dir",
        default="runs/ctx_cache",
        help="per-sequence context passes (K/V, teacher top-n) kept between epochs and runs ('' = off)",
    )
    p.add_argument(
        "--data-dir", default=None, help="self-distillation shards (default: data_cache/selfdistill)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the run dir's checkpoint")
    p.add_argument(
        "--precompute",
        action="store_true",
        help="only fill --cache-dir with context passes, in the order training reads them "
        "(run alongside a training run with the same settings to use a second core)",
    )
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on the shared 2-core machine)"
    )
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    weights = [float(x) for x in args.offset_weights.split(",") if x.strip()]
    return TrainConfig(
        layer=args.layer,
        k=args.k,
        epochs=args.epochs,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        batch_positions=args.batch_positions,
        positions_per_seq=args.positions_per_seq,
        prompt_frac=args.prompt_frac,
        n_top=args.n_top,
        loss=args.loss,
        offset_weights=weights,
        max_len=args.max_len,
        seed=args.seed,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        ckpt_every=args.ckpt_every,
        val_positions=args.val_positions,
    )


def load_data(
    n_train: int, n_val: int, data_dir: str | None = None
) -> tuple[list[Example], list[Example], dict]:
    from firp_engine.firp import data

    train_set = data.load_selfdistill("train", data_dir)
    val_set = data.load_selfdistill("validation", data_dir) if n_val else []
    if not train_set:
        raise FirpError("no self-distilled training data yet (see firp_engine/firp/data.py)")
    train_set = train_set[:n_train] if n_train else train_set
    val_set = val_set[:n_val]
    folder = Path(data_dir) if data_dir else data.CACHE_DIR

    def origin(split: str) -> dict:
        # data.py writes shard_<split>_sharegpt.pt for ShareGPT's own replies, numbered shards
        # for the model's greedy replies; the targets are the model's logits either way.
        names = [p.name for p in data._shards(folder, split)]
        n_sharegpt = sum("sharegpt" in n for n in names)
        kind = (
            "mixed"
            if 0 < n_sharegpt < len(names)
            else "ShareGPT's own"
            if n_sharegpt
            else "the model's greedy"
        )
        return {"shards": names, "replies": kind}

    desc = {
        "source": "ShareGPT prompts; targets are the model's own logits (self-distillation)",
        "train": origin("train"),
        "validation": origin("validation") if n_val else None,
        "train_sequences": len(train_set),
        "train_reply_tokens": sum(len(r) for _, r in train_set),
        "val_sequences": len(val_set),
    }
    return train_set, val_set, desc


def precompute(
    store: ContextStore, train_set: list[Example], val_set: list[Example], cfg: TrainConfig, progress: bool
) -> dict:
    if store.dir is None:
        raise FirpError("--precompute needs a --cache-dir")
    for idx in _bar(epoch_order(len(train_set), cfg.seed, 0), "context passes", progress):
        store.get(train_set[idx], [cfg.layer])
    for ex in _bar(val_set, "context passes, held out", progress):
        store.get(ex, [cfg.layer])
    print(json.dumps(store.stats()))
    return store.stats()


def trainer(kind: str):
    """(train, validate) for a head kind; both take the same arguments."""
    if kind == "medusa":
        from firp_engine.baselines import medusa_train as medusa

        return medusa.train_medusa, medusa.validate_medusa
    if kind != "firp":
        raise FirpError(f"unknown head kind {kind!r} (firp or medusa)")
    return train, validate


def run(args: argparse.Namespace, kind: str | None = None) -> dict:
    """`firp train-head`: FIRP (default) or, with --method medusa, Medusa-1 heads on the same
    data, context passes, loss and schedule (for Medusa --layer only picks the cached context
    layer the final states are recomputed from; default 20)."""
    from firp_engine.loading import load

    kind = kind or getattr(args, "method", None) or "firp"
    fit, check = trainer(kind)
    torch.set_num_threads(args.threads)
    if args.layer is None and kind == "medusa":
        args.layer = 20
    cfg = config_from_args(args)
    ckpt = load(args.model)
    model = Transformer(ckpt, args.dtype)
    if not 0 < cfg.layer < model.cfg.n_layers:
        raise FirpError(f"--layer must be in 1..{model.cfg.n_layers - 1}, got {cfg.layer}")
    train_set, val_set, desc = load_data(args.samples, args.val, args.data_dir)
    fingerprint = ckpt.fingerprint()
    store = ContextStore(
        model, [cfg.layer], cfg.n_top, cfg.max_len, cfg.prompt_frac > 0, args.cache_dir, fingerprint
    )
    out = Path(args.out)
    out = out.with_suffix("") if out.suffix in (".json", ".safetensors") else out
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / out.name
    progress = not args.no_progress
    if args.precompute:
        return precompute(store, train_set, val_set, cfg, progress)
    head, state = fit(model, train_set, cfg, store, run_dir / "checkpoint.pt", args.resume, progress)
    t0, c0 = time.monotonic(), time.process_time()
    val = check(model, head, val_set, cfg, store, progress) if val_set else {}
    argv = list(getattr(args, "argv", None) or sys.argv[1:])  # as typed, for the head's JSON
    argv = argv[1:] if argv[:1] == ["train-head"] else argv
    if kind != "firp" and "--method" not in argv:
        argv = ["--method", kind, *argv]
    meta = {
        "fingerprint": fingerprint,
        "model": Path(ckpt.source).name,
        "dtype": args.dtype,
        "command": "firp train-head " + shlex.join(argv),
        "train_config": asdict(cfg),
        "data": desc,
        "steps": state.step,
        "threads": args.threads,
        "train_wall_s": round(state.wall_s, 1),  # this invocation (a resumed run counts its last part)
        "train_cpu_s": round(state.cpu_s, 1),
        "validation_wall_s": round(time.monotonic() - t0, 1),
        "validation_cpu_s": round(time.process_time() - c0, 1),
        "context_passes": store.stats(),
        "trainable_params": head.n_params(),
        "final_train_loss": state.history[-1]["loss"] if state.history else None,
        "validation": {k: v for k, v in val.items() if k != "acc"},
        "acc": val.get("acc"),
    }
    head.save(out, meta)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "history.json").write_text(json.dumps(state.history) + "\n")
    print(json.dumps({"out": str(out), "train_wall_s": meta["train_wall_s"], **meta["validation"]}))
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="firp train-head", description="Train a FIRP head by self-distillation.")
    add_arguments(p)
    args = p.parse_args(argv)
    args.argv = argv
    try:
        run(args)
    except FirpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
