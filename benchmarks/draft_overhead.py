"""What drafting costs per step: the drafter's `propose` (tree growth, masks, lookups) in
microseconds and as a share of the whole step, for each FIRP tree kind.

    python benchmarks/draft_overhead.py [--threads 2] [--tokens 128] [--json out.json]

Runs the default model in bf16 on a few prompts per variant, timing every `propose` call
(for dynamic trees: the softmax and top-R of the pseudo rows, the best-first growth, the
layout lookup; for the hybrid also the n-gram lookup) against the total decode time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PROMPTS = [
    "Explain how a paged KV cache works in an inference engine.",
    "Rewrite this sentence in French: the cat sleeps on the warm windowsill all afternoon.",
    "List three differences between TCP and UDP, then summarize them in one sentence.",
]
VARIANTS = {
    "static": {"tree": "static", "lookup": False},
    "dynamic": {"tree": "dynamic", "lookup": False},
    "hybrid": {"tree": "dynamic", "lookup": True},
}


def main() -> None:
    from firp_engine.firp.dynamic import DynamicFirpDrafter
    from firp_engine.generate import LLM
    from firp_engine.sampling import SamplingParams
    from firp_engine.scheduler import Request
    from firp_engine.spec.step import SpecDecoder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--tree-budget", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(None, dtype="bf16", threads=args.threads)
    rows = []
    for name, opts in VARIANTS.items():
        drafter = DynamicFirpDrafter(llm, tree_budget=args.tree_budget, pseudo_policy="top:1", **opts)
        spent = [0.0, 0]
        propose = drafter.propose

        def timed(st, last, propose=propose, spent=spent):
            t = time.perf_counter()
            d = propose(st, last)
            spent[0] += time.perf_counter() - t
            spent[1] += 1
            return d

        drafter.propose = timed
        reqs = [Request(p, llm.encode(p), SamplingParams(), args.tokens) for p in PROMPTS]
        dec = SpecDecoder(llm, drafter)
        llm.run(dec, reqs[:1])  # warm-up
        spent[:] = [0.0, 0]
        res = [llm.run(dec, [r])[0] for r in reqs]  # batch 1
        decode = sum(r.decode_s + r.prefill_s for r in res)
        steps = spent[1]
        rows.append({
            "tree": name,
            "propose_us_per_step": round(1e6 * spent[0] / steps, 1),
            "share_of_step_pct": round(100 * spent[0] / decode, 2),
            "tokens_per_step": round(sum(r.new_tokens - 1 for r in res) / sum(r.steps for r in res), 3),
            "steps": steps,
        })  # fmt: skip
    print(f"default model, bf16, {args.threads} threads, {args.tree_budget}-node trees, root spawns\n")
    print("| tree | propose µs/step | share of step time | tokens/step |")
    print("|---|---|---|---|")
    for r in rows:
        us, pct, tau = r["propose_us_per_step"], r["share_of_step_pct"], r["tokens_per_step"]
        print(f"| {r['tree']} | {us} | {pct} % | {tau} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
