"""One training loop for draft heads (FIRP, Medusa), by self-distillation with the backbone frozen.

One example is one sequence (a prompt and the model's own greedy reply). Per step, a few
sequences; per sequence, a sample of positions p. Every head kind drafts from p the tokens
at p+1..p+k, and its loss compares what it predicts for offset i with the teacher's row p+i
(the model's own logits, which predict token p+i+1) from the cached context pass
(`context.py`). What differs between head kinds lives in an `Objective`: the module and
the loss (FIRP: `objective.py`, Medusa: `baselines/medusa_train.py`). Everything else is
here: sequence order, positions, teacher rows, optimizer, schedule, checkpoints, resume,
progress bar and the validation metrics.

Everything random is a function of (seed, epoch, sequence index), so a run resumed from
a checkpoint (head, optimizer, step) continues exactly as an uninterrupted one would.
The runner `firp train-head` is in `train_cli.py`.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from firp_engine.errors import FirpError
from firp_engine.firp.context import Context, ContextStore, Example
from firp_engine.model import Transformer

Segment = tuple[Context, torch.Tensor]  # one sequence's context pass and its positions p [G]


@dataclass
class TrainConfig:
    layer: int  # FIRP: pseudo rows enter here; Medusa: the cached layer final states are rebuilt from
    k: int
    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0  # decay would pull the maps towards 0, away from their identity start
    batch_positions: int = 128  # groups (positions p) per optimizer step
    positions_per_seq: int = 64  # groups sampled from one sequence
    prompt_frac: float = 0.0  # share of the sampled positions taken from the prompt
    n_top: int = 64  # teacher ids the KL runs over
    loss: str = "tail"  # 'tail' (top-n + a rest-of-vocab bucket) or 'top' (renormalised top-n; FIRP only)
    offset_weights: list[float] = field(default_factory=list)  # [] = all 1
    hidden_weight: float = 0.0  # FIRP: weight of the pseudo-state regression term (objective.py)
    root_embedding: bool = False  # FIRP: the maps also see the node token's embedding (head.py)
    max_len: int = 1024  # longer sequences are cut (attention memory)
    warmup: int = 20
    seed: int = 0
    max_steps: int = 0  # stop after this many steps in all (0 = run every epoch)
    max_minutes: float = 0.0  # stop training after this much wall time (0 = no limit)
    ckpt_every: int = 50
    val_positions: int = 0  # groups per held-out sequence (0 = every position)
    acc_ranks: int = 8  # ranks kept in the acceptance table acc[i][r]

    def __post_init__(self) -> None:
        if self.offset_weights and len(self.offset_weights) != self.k:
            raise FirpError(f"--offset-weights needs {self.k} values, got {len(self.offset_weights)}")

    @property
    def seqs_per_step(self) -> int:
        return max(1, self.batch_positions // self.positions_per_seq)

    def weights(self) -> torch.Tensor:
        """fp32 [k]: the loss weight of each offset."""
        return torch.tensor(self.offset_weights or [1.0] * self.k, dtype=torch.float32)


@dataclass(frozen=True)
class Objective:
    """What makes one kind of draft head. `loss` returns (offset-weighted loss, per-offset
    top-1 [k]) for a step's segments, with grad into the head; `ranks` returns, for one
    held-out sequence, int64 [G, k]: how many tokens the head puts above the teacher's
    argmax at each offset of each position. Heads have `k`, `n_params()` and `save(path, meta)`."""

    kind: str  # `--method` and the head file's "kind"
    make_head: Callable[[Transformer, TrainConfig], torch.nn.Module]
    loss: Callable[
        [Transformer, torch.nn.Module, list[Segment], TrainConfig], tuple[torch.Tensor, torch.Tensor]
    ]
    ranks: Callable[[Transformer, torch.nn.Module, Context, torch.Tensor, TrainConfig], torch.Tensor]
    default_layer: int | None = None  # TrainConfig.layer when the command line names none (None: required)


# ---------------------------------------------------------------- positions and teacher rows


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


def future_rows(pos: torch.Tensor, k: int) -> torch.Tensor:
    """Positions p [G] -> the rows p+1 .. p+k of each group, row-major [G * k]: where the
    group's pseudo rows sit, and the real rows they stand for."""
    return (pos[:, None] + torch.arange(1, k + 1)).reshape(-1)


def targets(segs: list[Segment], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher rows p+i for every (position, offset), row-major [N = (sum of G) * k]: top ids
    [N, n], top logits [N, n], full log-sum-exp [N], valid bool [N]."""
    ids, logits, lse, valid = [], [], [], []
    for ctx, pos in segs:
        rows = future_rows(pos, k)
        ok = (rows <= ctx.length - 2) & (rows >= ctx.row0)
        rows = (rows.clamp(max=ctx.length - 1) - ctx.row0).clamp(min=0)
        ids.append(ctx.top_ids[rows])
        logits.append(ctx.top_logits[rows])
        lse.append(ctx.lse[rows])
        valid.append(ok)
    return torch.cat(ids), torch.cat(logits), torch.cat(lse), torch.cat(valid)


def teacher_kl(
    logits: torch.Tensor, t_ids: torch.Tensor, t_logits: torch.Tensor, t_lse: torch.Tensor
) -> torch.Tensor:
    """Per-row KL(teacher || student) from full student logits [N, V], over the teacher's
    top-n ids [N, n] plus one bucket for the rest of the vocab, with true (full-softmax)
    probabilities on both sides: mass the student puts outside the teacher's top-n is
    penalised, so its full-vocab argmax is what the loss trains."""
    s_lse = logits.logsumexp(-1, keepdim=True)
    s_logp = logits.gather(1, t_ids) - s_lse  # [N, n]
    t_logp = t_logits - t_lse[:, None]
    t_p = t_logp.exp()
    kl = (t_p * (t_logp - s_logp)).sum(-1)
    if t_ids.shape[1] < logits.shape[1]:  # the rest-of-vocab bucket
        s_rest = logits.scatter(1, t_ids, float("-inf")).logsumexp(-1) - s_lse[:, 0]  # log q(rest) [N]
        t_rest = (1 - t_p.sum(-1)).clamp(min=0)
        kl = kl + torch.xlogy(t_rest, t_rest) - t_rest * s_rest
    return kl


def offset_mean(
    kl: torch.Tensor, hit: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """kl [N], hit bool [N], valid bool [N] in targets' row order, weights [k] -> (the
    offset-weighted mean over valid rows, per-offset top-1 [k]). Offsets without a valid row
    drop out of the weighting."""
    k = weights.shape[0]
    kl, hit, valid = kl.view(-1, k), hit.view(-1, k).float(), valid.view(-1, k).float()
    n_valid = valid.sum(0)  # [k]
    per_offset = (kl * valid).sum(0) / n_valid.clamp(min=1)
    w = weights * (n_valid > 0)
    return (per_offset * w).sum() / w.sum(), (hit * valid).sum(0) / n_valid.clamp(min=1)


# ---------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per step: loss, top1 per offset
    cpu_s: float = 0.0  # this run's process CPU time in train(), context passes included
    wall_s: float = 0.0


def save_checkpoint(
    path: Path, head: torch.nn.Module, opt: torch.optim.Optimizer, state: TrainState, cfg: TrainConfig
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


def load_checkpoint(
    path: Path, head: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig
) -> TrainState:
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


# ---------------------------------------------------------------- the loop


def progress_bar(it: Iterable, desc: str, on: bool, total: int | None = None, initial: int = 0):
    """`it` itself, or wrapped in a tqdm bar on stderr when `on`."""
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


def step_segments(
    examples: list[Example], cfg: TrainConfig, store: ContextStore, step: int, per_epoch: int
) -> list[Segment]:
    """The sequences of one optimizer step and the positions sampled from each."""
    epoch, j = divmod(step, per_epoch)
    picked = epoch_order(len(examples), cfg.seed, epoch)[j * cfg.seqs_per_step : (j + 1) * cfg.seqs_per_step]
    segs = []
    for idx in picked:
        ctx = store.get(examples[idx], [cfg.layer])
        gen = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch * 100003 + idx)
        pos = sample_positions(ctx, cfg, gen)
        if len(pos):
            segs.append((ctx, pos))
    return segs


def check_config(model: Transformer, cfg: TrainConfig) -> None:
    if not 0 < cfg.layer < model.cfg.n_layers:
        raise FirpError(f"--layer must be in 1..{model.cfg.n_layers - 1}, got {cfg.layer}")
    if cfg.k < 1:
        raise FirpError(f"--k must be >= 1, got {cfg.k}")


def train(
    model: Transformer,
    objective: Objective,
    examples: list[Example],
    cfg: TrainConfig,
    store: ContextStore | None = None,
    ckpt_path: Path | None = None,
    resume: bool = False,
    progress: bool = False,
) -> tuple[torch.nn.Module, TrainState]:
    """Train a fresh head of the objective's kind (or continue the one in ckpt_path)."""
    check_config(model, cfg)
    if not examples:
        raise FirpError("no training sequences")
    torch.manual_seed(cfg.seed)
    head = objective.make_head(model, cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = TrainState()
    if resume and ckpt_path is not None and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, head, opt, cfg)
    store = store or ContextStore(model, [cfg.layer], cfg.n_top, cfg.max_len, cfg.prompt_frac > 0)
    per_epoch = math.ceil(len(examples) / cfg.seqs_per_step)
    total = per_epoch * cfg.epochs
    stop = min(total, cfg.max_steps) if cfg.max_steps else total
    t0, c0 = time.monotonic(), time.process_time()
    bar = progress_bar(range(state.step, stop), f"train {objective.kind}", progress, stop, state.step)
    for step in bar:
        if cfg.max_minutes and time.monotonic() - t0 > 60 * cfg.max_minutes:
            break
        segs = step_segments(examples, cfg, store, step, per_epoch)
        if segs:
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step, total)
            with torch.enable_grad():
                loss, top1 = objective.loss(model, head, segs, cfg)
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


# ---------------------------------------------------------------- validation


def rank_metrics(rank: torch.Tensor, n_ranks: int) -> dict:
    """rank int64 [N, k]: tokens put above the teacher's argmax at each offset.

    top1/top5 per offset; acc[i][r] = P(rank at offset i+1 == r | the teacher's tokens at
    offsets 1..i all rank < n_ranks): what a tree builder multiplies along a path of
    candidates; chain_accepted: mean drafted tokens a greedy chain keeps (bonus excluded)."""
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
def validate(
    model: Transformer,
    objective: Objective,
    head: torch.nn.Module,
    examples: list[Example],
    cfg: TrainConfig,
    store: ContextStore | None = None,
    progress: bool = False,
) -> dict:
    """Full-vocab rank metrics (see rank_metrics) on held-out sequences, against the teacher's
    greedy token, at every position with a target for every offset (or val_positions of them)."""
    store = store or ContextStore(model, [cfg.layer], 1, cfg.max_len)
    ranks = []
    for ex in progress_bar(examples, "validate", progress):
        ctx = store.get(ex, [cfg.layer])
        _, pos = candidate_positions(ctx, cfg.k, full_groups=True)
        if len(pos) == 0:
            continue
        if cfg.val_positions and len(pos) > cfg.val_positions:
            pos = pos[torch.linspace(0, len(pos) - 1, cfg.val_positions).round().long()]
        ranks.append(objective.ranks(model, head, ctx, pos, cfg))
    if not ranks:
        raise FirpError("no held-out sequence is long enough to validate on")
    return rank_metrics(torch.cat(ranks), cfg.acc_ranks)
