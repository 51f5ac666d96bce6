"""Medusa-1 heads: a baseline drafter on the final hidden state, same data and budget as FIRP.

Head i (i = 1..k) is a ResBlock z_i = x + SiLU(W_i x + b_i) on x, the final hidden state
(after the final norm) of the newest token at position p, decoded by the model's own LM
head: it predicts token p+i+1 (the model's real logits at p give token p+1). W_i starts at
zero, so an untrained head i repeats the next-token prediction.

Choice for this CPU: the LM head is the model's, frozen and shared by every offset, so only
the ResBlocks train: k*(d*d + d) parameters, exactly FIRP's k*d*d + k*d (Medusa-1 proper
trains one LM head per offset, k*V*d more: 85M for the default model). Both drafters then
get the same trainable size, the same sequences, positions, teacher, loss, steps and seed.

Decoding (`MedusaDecoder`): the draft tree comes from the heads' top-R candidates, built by
the same Tree.build as FIRP's but without pseudo rows; one tree forward verifies it, the
walk (greedy or lossless sampling) gives the accepted path and the bonus token, and the
heads on the last accepted node's final hidden state draft the next tree.

    python -m firp_engine.baselines.medusa --k 3 --samples 2000 --epochs 1 --out runs/medusa
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from firp_engine import ops
from firp_engine.errors import FirpError
from firp_engine.firp import train as T
from firp_engine.firp.decode import FirpDecoder, StepStats
from firp_engine.firp.head import read_head_files, resolve_head
from firp_engine.firp.tree import Tree, default_acc, default_tree
from firp_engine.firp.verify import greedy_walk, sample_walk
from firp_engine.generate import State, prefill
from firp_engine.model import Batch, SeqRows, Transformer
from firp_engine.sampling import SamplingParams


class MedusaHead(torch.nn.Module):
    def __init__(self, d: int, k: int, meta: dict | None = None) -> None:
        super().__init__()
        self.k = k
        self.weight = torch.nn.Parameter(torch.zeros(k, d, d))  # [k, d_out, d_in]
        self.bias = torch.nn.Parameter(torch.zeros(k, d))
        self.meta = dict(meta or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, d] (after the final norm) -> LM-head inputs [n, k, d] (offsets 1..k)."""
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return x[:, None] + torch.nn.functional.silu(torch.einsum("nd,ked->nke", x, w) + b)

    def n_params(self) -> int:
        return self.weight.numel() + self.bias.numel()

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path).with_suffix("")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.meta.update(meta or {})
        self.meta.update(
            {"k": self.k, "d": self.weight.shape[-1], "kind": "medusa", "lm_head": "model, frozen"}
        )
        tensors = {"weight": self.weight.detach().float().contiguous(), "bias": self.bias.detach().float()}
        save_file(tensors, str(path) + ".safetensors")
        Path(str(path) + ".json").write_text(json.dumps(self.meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> MedusaHead:
        meta, tensors = read_head_files(path, fingerprint, "medusa")
        head = cls(int(meta["d"]), int(meta["k"]), meta)
        with torch.no_grad():
            head.weight.copy_(tensors["weight"])
            head.bias.copy_(tensors["bias"])
        return head


def head_logits(model: Transformer, head: MedusaHead, x: torch.Tensor) -> torch.Tensor:
    """x [n, d] final hidden states after the norm -> fp32 logits [n, k, V] (autograd-safe)."""
    z = head(x)
    w = model.lm_head.weight
    if torch.is_grad_enabled():
        return torch.nn.functional.linear(z.float(), w.float())
    return model.lm_head(z.reshape(-1, z.shape[-1])).float().view(*z.shape[:2], -1)


# ---------------------------------------------------------------- decoding


class MedusaDecoder:
    """One request at a time: the tree is drafted from the last accepted node's heads."""

    batched = False

    def __init__(
        self,
        llm,
        params: SamplingParams,
        head: MedusaHead | str | Path | None = None,
        tree_budget: int | None = None,
        acc: list[list[float]] | None = None,
        **_: object,
    ) -> None:
        self.model, self.params = llm.model, params
        self.chunk, self.max_context = llm.prefill_chunk, llm.max_context
        cfg = self.model.cfg
        h = resolve_head(llm, head, MedusaHead, "medusa")
        if h.weight.shape[-1] != cfg.hidden_size:
            raise FirpError(
                f"Medusa head (d={h.weight.shape[-1]}) does not fit this model (d={cfg.hidden_size})"
            )
        self.head = copy.deepcopy(h).to(self.model.dtype).requires_grad_(False)
        self.k = h.k
        acc = [list(r) for r in (acc or h.meta.get("acc") or default_acc(self.k))][: self.k]
        self.width = min(max(len(r) for r in acc), cfg.vocab_size)
        built = Tree.build(acc, tree_budget or default_tree(llm.backend)[0], len(acc))
        self.tree = Tree(built.nodes, 0, list(range(built.n)))  # k = 0: no pseudo rows
        self.root_tree = Tree.chain(0, 0)
        shape = (cfg.n_layers, self.tree.n, cfg.n_kv_heads, cfg.head_dim)
        self.scratch = (
            torch.empty(shape, dtype=self.model.dtype),
            torch.empty(shape, dtype=self.model.dtype),
        )
        self.stats = StepStats()

    def prefill(self, st: State) -> list[int]:
        prefill(self.model, st.seq, st.tokens[:-1], self.chunk)
        st.extra.update(tree=self.root_tree, cands=torch.empty(0, self.width, dtype=torch.int64))
        return self.run_step(st)

    def step(self, states: list[State]) -> list[list[int]]:
        return [self.run_step(st, count=True) for st in states]

    def run_step(self, st: State, count: bool = False) -> list[int]:
        model, tree, cands = self.model, st.extra["tree"], st.extra["cands"]
        tokens = tree.node_tokens(st.tokens[-1], cands)
        # positions past the RoPE table only occur for drafts past the context: never accepted
        pos = (st.seq.length + tree.offsets).clamp_(max=model.cos.shape[0] - 1)
        batch = Batch(pos, [SeqRows(st.seq, 0, tree.n, tree.tree_bits)], "tree", scratch=self.scratch)
        h = model.forward(batch, model.embed_tokens(tokens))
        logits = model.logits(h)
        tok_list = tokens.tolist()
        max_drafts = max(0, self.max_context - len(st.tokens) - 1)
        if self.params.greedy:
            path, bonus = greedy_walk(tree, tok_list, logits.argmax(-1).tolist(), max_drafts)
        else:
            path, bonus = sample_walk(tree, tok_list, logits, self.params, st.gen, max_drafts)
        new = [tok_list[j] for j in path[1:]] + [bonus]
        if count:
            self.stats.add(len(new), FirpDecoder._hits(cands, new))
        st.extra.update(tree=self.tree, cands=self.draft(st, h[path[-1]], new))
        st.seq.commit(self.scratch[0], self.scratch[1], path)
        return new

    def draft(self, st: State, h: torch.Tensor, new: list[int]) -> torch.Tensor:
        """The next tree's candidates int64 [k, width] from the last accepted node's final
        hidden state h [d] (st and new, the step's tokens, are for drafters that need them)."""
        x = ops.call("rms_norm", h[None], self.model.norm, self.model.cfg.rms_eps)
        return torch.topk(head_logits(self.model, self.head, x)[0], self.width, dim=-1).indices


# ---------------------------------------------------------------- training


@torch.no_grad()
def final_states(model: Transformer, ctx: T.Context, layer: int) -> torch.Tensor:
    """[T, d] final hidden states after the final norm: layers [layer, L) re-run from the
    context's h[layer] (a cached context pass keeps h at the FIRP layer, not at the top)."""
    t = ctx.length
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ops._attend(q, k, v, causal, model.scale)

    x, positions = ctx.h[layer].to(model.dtype).clone(), torch.arange(t)
    for i in range(layer, model.cfg.n_layers):
        x = model.run_layer(i, x, positions, attend)
    return ops.call("rms_norm", x, model.norm, model.cfg.rms_eps)


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
