"""The Medusa-1 heads' training objective (see medusa.py) for the shared loop of firp/train.py:
same sequences, positions, teacher rows, KL and schedule as FIRP for the same TrainConfig.

TrainConfig.layer only names the cached context layer that the final hidden states are
rebuilt from (a context pass keeps h at the FIRP layer, not at the top); the loss is always
the top-n + rest-of-vocab KL (`loss` is FIRP's choice).
"""

from __future__ import annotations

import torch

from firp_engine import ops
from firp_engine.baselines.medusa import MedusaHead, head_logits
from firp_engine.firp.context import Context
from firp_engine.firp.train import Objective, Segment, TrainConfig, offset_mean, targets, teacher_kl
from firp_engine.model import Transformer


@torch.no_grad()
def final_states(model: Transformer, ctx: Context, layer: int) -> torch.Tensor:
    """[T, d] final hidden states after the final norm: layers [layer, L) re-run from the
    context's h[layer]."""
    t = ctx.length
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ops.attend(q, k, v, causal, model.scale)

    x, positions = ctx.h[layer].to(model.dtype).clone(), torch.arange(t)
    for i in range(layer, model.cfg.n_layers):
        x = model.run_layer(i, x, positions, attend)
    return model.final_norm(x)


def medusa_loss(
    model: Transformer, head: MedusaHead, segs: list[Segment], cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Offset-weighted mean KL of the heads' logits (no final norm: a Medusa head's output
    goes straight into the LM head), per-offset top-1 against the teacher's argmax [k]."""
    t_ids, t_logits, t_lse, valid = targets(segs, head.k)
    x = torch.cat([final_states(model, ctx, cfg.layer)[pos] for ctx, pos in segs]).float()  # [G, d]
    logits = head_logits(model, head, x).reshape(-1, model.cfg.vocab_size)  # [G*k, V]
    kl = teacher_kl(logits, t_ids, t_logits, t_lse)
    return offset_mean(kl, logits.argmax(-1) == t_ids[:, 0], valid, cfg.weights())


@torch.no_grad()
def medusa_ranks(
    model: Transformer, head: MedusaHead, ctx: Context, pos: torch.Tensor, cfg: TrainConfig
) -> torch.Tensor:
    """int64 [G, k]: rank of the teacher's argmax among each head's logits at positions pos."""
    want = targets([(ctx, pos)], head.k)[0][:, 0].view(-1, head.k)
    logits = head_logits(model, head, final_states(model, ctx, cfg.layer)[pos])  # [G, k, V]
    return (logits > logits.gather(2, want[..., None])).sum(-1)


MEDUSA = Objective(
    "medusa",
    make_head=lambda model, cfg: MedusaHead(model.cfg.hidden_size, cfg.k),
    loss=medusa_loss,
    ranks=medusa_ranks,
    default_layer=20,  # any cached layer serves; a high one leaves few layers to re-run
)
