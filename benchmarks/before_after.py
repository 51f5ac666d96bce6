"""Two checkouts of this engine, same machine, one run: plain decode and FIRP speed, A/B.

    python benchmarks/before_after.py --trees /path/to/old /path/to/new [--rounds 3]
        [--methods ar firp:tree_budget=4,pseudo_policy=top:1] [--json out.json]

Each tree runs in its own process (its own code and C++ extension, from PYTHONPATH), and the
trees alternate round by round (A B A B ...) so that machine drift hits both alike. Every
round decodes the same prompts greedily in bf16 on the cpu backend; the figure is decode
time per token (prefill excluded), the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from firp_engine.backend import cpu_model

PROMPTS = [
    "Explain how a paged KV cache works in an inference engine.",
    "Write a short story about a robot learning to paint.",
    "What are the main differences between Python lists and tuples?",
    "Summarize the causes of the French Revolution in five bullet points.",
]

# Runs inside the tree under test: prints one JSON line {method: [decode_s, tokens]}.
CHILD = r"""
import json, sys, torch
from firp_engine.generate import LLM
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
try:
    llm = LLM(None, dtype="bf16", backend="cpu", threads=args["threads"], weights=args["weights"])
except TypeError:  # a tree from before weight formats: dense only
    assert args["weights"] == "dense", "this tree has dense weights only"
    llm = LLM(None, dtype="bf16", backend="cpu", threads=args["threads"])
llm.generate("Hello", max_new_tokens=8)  # warm-up
out = {}
for spec in args["methods"]:
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        opts[k] = int(v) if v.isdigit() else v
    secs = toks = 0.0
    for p in args["prompts"]:  # one request at a time: batch 1
        r = llm.generate(p, name, max_new_tokens=args["tokens"], **opts)[0]
        secs, toks = secs + r.decode_s, toks + r.new_tokens - 1
    out[spec] = [secs, toks]
print(json.dumps(out))
"""


def run_tree(tree: Path, methods: list[str], args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
    payload = {
        "methods": methods,
        "prompts": PROMPTS,
        "tokens": args.tokens,
        "threads": args.threads,
        "weights": args.weights,
    }
    res = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(payload)], cwd=tree, env=env, capture_output=True, text=True
    )
    if res.returncode:
        raise SystemExit(f"{tree}: {res.stderr.strip().splitlines()[-1]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs=2, type=Path, required=True, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--methods", nargs="+", default=["ar", "firp:tree_budget=4,pseudo_policy=top:1"])
    ap.add_argument(
        "--after-methods", nargs="+", default=None, help="the same methods as the AFTER tree spells them"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--weights", default="dense", choices=["dense", "native"], help="both trees")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    spelled = {str(args.trees[0]): args.methods, str(args.trees[1]): args.after_methods or args.methods}
    ms: dict[str, dict[str, list[float]]] = {str(t): {m: [] for m in args.methods} for t in args.trees}
    for r in range(args.rounds):
        for tree in args.trees if r % 2 == 0 else args.trees[::-1]:
            got = run_tree(tree, spelled[str(tree)], args)
            for m, spec in zip(args.methods, spelled[str(tree)], strict=True):
                secs, toks = got[spec]
                ms[str(tree)][m].append(1e3 * secs / toks)
            print(f"round {r + 1}: {tree} done", file=sys.stderr)
    before, after = (str(t) for t in args.trees)
    lines = [
        f"{cpu_model()}, {args.threads} threads, bf16, cpu backend, batch 1, greedy, "
        f"{len(PROMPTS)} prompts x {args.tokens} tokens, median of {args.rounds} alternating rounds",
        "",
        "| method | before ms/token | after ms/token | after / before |",
        "|---|---|---|---|",
    ]
    for m in args.methods:
        b, a = statistics.median(ms[before][m]), statistics.median(ms[after][m])
        lines.append(f"| {m} | {b:.2f} | {a:.2f} | {a / b:.3f} |")
    print("\n".join(lines))
    if args.json:
        record = {"cpu": cpu_model(), "ms_per_token": ms, "args": vars(args)}
        args.json.write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
