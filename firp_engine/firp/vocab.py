"""The draft vocabulary: the pseudo rows decode over the most frequent tokens only.

Verification needs the full LM head on the tree rows (the target's argmax or distribution
over all V tokens). Drafting does not: a pseudo row only proposes its top few candidates,
and on this model 16,384 of the 49,152 tokens cover 99.7 % of the training replies' tokens
(FR-Spec's observation, arXiv 2502.14856). With `draft_vocab=N` the pseudo rows go through
an LM head over the first N tokens of a frequency order (the same weight rows, so each logit
equals the full head's), and their top-k and softmax run over N values. A token outside the
draft vocabulary is never a FIRP draft; lookup chains still propose it, and output never
changes: verification is untouched.

Off by default (N = 0): on the CPUs measured (benchmarks/RESULTS.md, session 8) it did not
pay. The planner's trees spawn one pseudo group, whose rows ride the step's one full
LM-head pass almost free while that pass is bandwidth-bound; a second, smaller pass streams
its own weight rows again and cost more than the rows and the 49k-wide top-k it saved.
Where steps spawn several groups (bigger trees, a GPU) their logits need a pass of their own
anyway, and there the small head is the cheaper one.

The order is counted on the head's training replies (never the evaluation questions) and
saved in the head file (`vocab_order`). For a head trained before this existed:

    python -m firp_engine.firp.vocab firp_engine/heads/smollm2-135m-firp --data data/selfdistill
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from firp_engine.errors import FirpError

DEFAULT_DRAFT_VOCAB = 0  # tokens the pseudo rows decode over by default (0: all; see above)


def token_order(replies: Iterable[Sequence[int] | np.ndarray], vocab_size: int) -> torch.Tensor:
    """int64 [vocab_size]: token ids by count in `replies`, most frequent first (ties: lower id)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for r in replies:
        ids = np.asarray(r, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise FirpError(f"token ids outside [0, {vocab_size}) in the draft-vocabulary data")
        counts += np.bincount(ids, minlength=vocab_size)
    return torch.from_numpy(np.argsort(-counts, kind="stable"))


def coverage(order: torch.Tensor, replies: Iterable[Sequence[int]], n: int) -> float:
    """Fraction of the tokens of `replies` inside the first n tokens of `order`."""
    keep = torch.zeros(order.numel(), dtype=torch.bool)
    keep[order[:n]] = True
    hit = tot = 0
    for r in replies:
        ids = torch.as_tensor(np.asarray(r, dtype=np.int64))
        hit, tot = hit + int(keep[ids].sum()), tot + ids.numel()
    return hit / max(tot, 1)


def draft_rows(order: torch.Tensor | None, n: int | None, vocab_size: int) -> torch.Tensor | None:
    """The LM-head rows the pseudo rows decode over: the first n of `order`, sorted (int64), or
    None for the full vocabulary (n = 0, n >= vocab_size, or n unset with the default 0 or no
    order)."""
    if n is None:
        n = DEFAULT_DRAFT_VOCAB if order is not None else 0
    if n < 0:
        raise FirpError(f"draft_vocab must be >= 0, got {n}")
    if n == 0 or n >= vocab_size:
        return None
    if order is None:
        raise FirpError(
            "this FIRP head has no vocab_order for a draft vocabulary: add one with "
            "`python -m firp_engine.firp.vocab HEAD --data DIR`, or pass draft_vocab=0"
        )
    if order.numel() != vocab_size:
        raise FirpError(f"the head's vocab_order has {order.numel()} ids, the model {vocab_size}")
    return order[:n].sort().values


def main(argv: list[str] | None = None) -> None:
    """Add a vocab_order, counted on the train split of self-distillation folders, to a head."""
    from firp_engine.firp.head import FirpHead, read_head_files
    from firp_engine.firp.shards import ShardFolder

    p = argparse.ArgumentParser(prog="python -m firp_engine.firp.vocab", description=main.__doc__)
    p.add_argument("head", help="head path (without .json / .safetensors)")
    p.add_argument("--data", action="append", required=True, help="shard folder (repeatable)")
    args = p.parse_args(argv)
    meta, _ = read_head_files(args.head, None, "firp")
    head = FirpHead.load(args.head)
    folders = [ShardFolder(d) for d in args.data]
    if not all(f.is_shards() for f in folders):
        raise SystemExit("error: --data must name self-distillation shard folders")
    vocab = int(folders[0].meta()["settings"]["vocab_size"])
    replies = [r for f in folders for _, _, r in f.records("train")]
    head.vocab_order = token_order(replies, vocab)
    cover = {n: round(coverage(head.vocab_order, replies, n), 4) for n in (4096, 8192, 16384)}
    meta["vocab_order"] = {"counted_on": "train-split replies", "folders": args.data, "coverage": cover}
    head.save(args.head, meta)
    print(json.dumps({"head": str(Path(args.head)), **meta["vocab_order"]}))


if __name__ == "__main__":
    main()
