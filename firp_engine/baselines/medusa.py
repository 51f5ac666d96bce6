"""Medusa-1 heads: a baseline drafter on the final hidden state, same data and budget as FIRP.

Head i (i = 1..k) is a ResBlock z_i = x + SiLU(W_i x + b_i) on x, the final hidden state
(after the final norm) of the newest token at position p, decoded by the model's own LM
head: it predicts token p+i+1 (the model's real logits at p give token p+1). W_i starts at
zero, so an untrained head i repeats the next-token prediction.

Choice for this CPU: the LM head is the model's, frozen and shared by every offset, so only
the ResBlocks train: k*(d*d + d) parameters, exactly FIRP's k*d*d + k*d (Medusa-1 proper
trains one LM head per offset, k*V*d more: 85M for the default model). Both drafters then
get the same trainable size, the same sequences, positions, teacher, loss, steps and seed.

Drafting (`MedusaDrafter`): the heads on the last accepted node's final hidden state give
top-R candidates per offset for a static tree built like FIRP's (DraftTree.build), without
added rows; the speculative step (spec/step.py) verifies it. Training: medusa_train.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from firp_engine.errors import FirpError
from firp_engine.firp.head import read_head_files, resolve_head
from firp_engine.model import Transformer
from firp_engine.scheduler import State
from firp_engine.spec.step import Draft, StepOutput
from firp_engine.spec.tree import DraftTree, default_acc, default_tree


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
    if torch.is_grad_enabled():
        return torch.nn.functional.linear(z.float(), model.lm_head.weight.float())
    return model.lm_head(z.reshape(-1, z.shape[-1])).float().view(*z.shape[:2], -1)


# ---------------------------------------------------------------- drafting


class MedusaDrafter:
    """The heads on the last accepted node's final hidden state draft a static tree."""

    def __init__(
        self,
        llm,
        head: MedusaHead | str | Path | None = None,
        tree_budget: int | None = None,
        acc: list[list[float]] | None = None,
    ) -> None:
        self.model = llm.model
        cfg = self.model.cfg
        h = resolve_head(llm, head, MedusaHead, "medusa")
        if h.weight.shape[-1] != cfg.hidden_size:
            raise FirpError(
                f"Medusa head (d={h.weight.shape[-1]}) does not fit this model (d={cfg.hidden_size})"
            )
        self.head = copy.deepcopy(h).to(self.model.dtype).to(self.model.device).requires_grad_(False)
        self.k = h.k
        acc = [list(r) for r in (acc or h.meta.get("acc") or default_acc(self.k))][: self.k]
        self.width = min(max(len(r) for r in acc), cfg.vocab_size)
        self.tree = DraftTree.build(acc, tree_budget or default_tree(self.model.device)[0])
        self.root = DraftTree.chain(0)
        self.max_rows = self.tree.n

    def propose(self, st: State, last: StepOutput | None) -> Draft:
        if last is None:
            return Draft(self.root, [st.tokens[-1]])
        cands = self.candidates(last.h[last.path[-1]])
        return Draft(self.tree, self.tree.node_tokens(st.tokens[-1], cands).tolist())

    def candidates(self, h: torch.Tensor) -> torch.Tensor:
        """int64 [k, width] candidates per offset from one final hidden state h [d]."""
        x = self.model.final_norm(h[None])
        return torch.topk(head_logits(self.model, self.head, x)[0], self.width, dim=-1).indices.cpu()
