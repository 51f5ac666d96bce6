"""The FIRP drafter: pseudo rows of the step's own forward draft the next tree.

The tree nodes that spawn (firp/pseudo.py) get k pseudo rows each: the head maps their
layer-l states to k pseudo states, which run layers [l, L) beside the tree rows. After the
step (spec/step.py) has verified the tree, the last accepted node's pseudo rows, decoded by
the LM head, give the top-R candidates per offset of the next tree. So drafting costs no
forward of its own: a few extra rows in the verification forward.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from firp_engine.errors import FirpError, FirpWarning
from firp_engine.firp.budget import cost_curve, head_pass, plan
from firp_engine.firp.head import FirpHead, resolve_head
from firp_engine.firp.pseudo import PseudoLayout, parse_policy, spawning
from firp_engine.firp.vocab import draft_rows
from firp_engine.scheduler import State
from firp_engine.spec.step import Draft, StepOutput
from firp_engine.spec.tree import DraftTree, default_acc, default_tree


class FirpDrafter:
    def __init__(
        self,
        llm,
        head: FirpHead | str | Path | None = None,
        tree_budget: int | None = None,
        pseudo_policy: str | None = None,
        acc: list[list[float]] | None = None,
        draft_vocab: int | None = None,
    ) -> None:
        self.model = llm.model
        cfg = self.model.cfg
        h = resolve_head(llm, head, FirpHead, "firp")
        if h.weight.shape[-1] != cfg.hidden_size or not 0 < h.layer < cfg.n_layers:
            raise FirpError(
                f"FIRP head (d={h.weight.shape[-1]}, layer {h.layer}) does not fit this model "
                f"(d={cfg.hidden_size}, {cfg.n_layers} layers)"
            )
        # The maps in the run's dtype and on its device, so a step casts nothing.
        self.weight = h.weight.detach().to(self.model.dtype, copy=True).to(self.model.device)
        self.bias = h.bias.detach().to(self.model.dtype, copy=True).to(self.model.device)
        self.emb_weight = None  # the root-embedding variant's maps (head.py)
        if h.emb_weight is not None:
            self.emb_weight = h.emb_weight.detach().to(self.model.dtype, copy=True).to(self.model.device)
        self.layer, self.k = h.layer, h.k
        acc = [list(r) for r in (acc or h.meta.get("acc") or default_acc(self.k))][: self.k]
        self.share = (cfg.n_layers - self.layer) / cfg.n_layers  # the pseudo rows' layers
        # The pseudo rows' vocabulary first: it sets the cost of their own LM-head pass.
        self.vocab = draft_rows(h.vocab_order, draft_vocab, cfg.vocab_size)
        self.draft_head = None if self.vocab is None else self.model.head_rows(self.vocab)
        if self.vocab is not None and self.draft_head is None:
            warnings.warn("the LM head's weight is not kept: draft vocabulary off", FirpWarning, stacklevel=2)
            self.vocab = None
        n_vocab = cfg.vocab_size if self.vocab is None else self.vocab.numel()
        self.head_pass = head_pass(self.model, n_vocab)
        self.planned: tuple[int, str, float] | None = None  # (budget, policy, expected speedup)
        if tree_budget is None and pseudo_policy is None:  # the machine decides (firp/budget.py)
            self.planned = plan(acc, self.k, cost_curve(llm), self.share, self.head_pass)
            tree_budget, pseudo_policy, _ = self.planned
        budget, default_policy = default_tree(self.model.device)
        policy, top = parse_policy(pseudo_policy or default_policy)
        self.width = min(max(len(r) for r in acc), n_vocab)  # candidates kept per offset

        self.policy, self.top = policy, top
        if len(acc) > self.k:
            raise FirpError(f"an acceptance table of depth {len(acc)} needs k >= {len(acc)}, got {self.k}")

        def layout(tree: DraftTree) -> PseudoLayout:
            return PseudoLayout(tree, self.layer, self.k, spawning(tree, policy, top))

        self.full = layout(DraftTree.build(acc, tree_budget or budget))
        # delta = depth of the accepted node below its nearest spawning ancestor: that
        # ancestor's offsets delta+1..k draft a chain (root only once they run out).
        self.fallback = {d: layout(DraftTree.chain(max(0, self.k - d))) for d in range(1, self.k + 1)}
        self.root = layout(DraftTree.chain(0))
        self.max_rows = max(lay.n_rows for lay in [self.full, self.root, *self.fallback.values()])

    def extra_rows(self, draft: Draft, h: torch.Tensor) -> torch.Tensor:
        """The spawning nodes' layer-l states [m, d] -> their pseudo rows [m * k, d]."""
        idx = draft.layout.spawn_idx
        rows = self.model.backend.call("firp_project", h[idx], self.weight, self.bias)
        if self.emb_weight is not None:  # + U_i e(token) of each spawning node
            e = self.model.embed_tokens([draft.tokens[j] for j in draft.layout.spawn])
            rows = rows + self.model.backend.call("firp_project", e, self.emb_weight, None)
        return rows

    def propose(self, st: State, last: StepOutput | None) -> Draft:
        if last is None:
            return self.draft(st, self.root, torch.empty(0, self.width, dtype=torch.int64))
        lay, cands = self.candidates(last)
        return self.draft(st, lay, cands)

    def draft(self, st: State, lay: PseudoLayout, cands: torch.Tensor) -> Draft:
        """Node tokens from cands int64 [depth, R] (row d-1: depth d)."""
        tokens = lay.tree.node_tokens(st.tokens[-1], cands).tolist()
        return Draft(lay.tree, tokens, lay, self.logit_rows(lay))

    def logit_rows(self, lay: PseudoLayout) -> int:
        """Rows of the step's full LM-head pass: the tree's, plus the pseudo rows when a single
        group exists and there is no draft vocabulary (cheaper than decoding it separately)."""
        one_group = lay.n_rows - lay.tree.n <= self.k
        return lay.n_rows if one_group and self.draft_head is None else 0

    def token_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices into pseudo_logits' columns -> token ids."""
        return idx if self.vocab is None else self.vocab[idx]

    def pseudo_logits(self, last: StepOutput) -> torch.Tensor:
        """fp32 logits [k - delta, V or the draft vocabulary's N] of the pseudo rows that draft
        the next tree: those of the last accepted node or, if it spawned none, of its deepest
        spawning ancestor, delta levels up (their first delta offsets are spent)."""
        lay: PseudoLayout = last.draft.layout
        group, delta = lay.source[last.path[-1]]
        rows = lay.pseudo_rows(group)[delta:]
        if self.draft_head is not None:
            return self.draft_head(self.model.final_norm(last.h[rows.start : rows.stop])).float()
        if rows.stop <= last.logits.shape[0]:
            return last.logits[rows.start : rows.stop]
        # only these k - delta pseudo rows go through the LM head (V x d each), not all
        return self.model.logits(last.h[rows.start : rows.stop])

    def candidates(self, last: StepOutput) -> tuple[PseudoLayout, torch.Tensor]:
        """The next layout and its candidates int64 [k - delta, width]."""
        rl = self.pseudo_logits(last)
        nxt = self.full if rl.shape[0] == self.k else self.fallback[self.k - rl.shape[0]]
        return nxt, self.token_ids(torch.topk(rl, self.width, dim=-1).indices).cpu()
