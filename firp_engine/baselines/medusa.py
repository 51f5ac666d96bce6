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

import copy
import json
from pathlib import Path

import torch

from firp_engine.errors import FirpError
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
        x = self.model.final_norm(h[None])
        return torch.topk(head_logits(self.model, self.head, x)[0], self.width, dim=-1).indices


