"""Spec-Bench: speedup over plain decoding and mean accepted tokens, per category, one run.

    python benchmarks/spec_bench.py --methods ar firp pld medusa [--limit 2] [--dtype bf16]
        [--out benchmarks/results/spec_bench]

A method may carry decoder options: `firp:tree_budget=4,pseudo_policy=top:1` is FIRP with a
4-node tree whose root alone spawns pseudo rows (`head=PATH` picks a head file); each
variant is its own column.

Every method decodes the same questions (first turn, chat template, greedy, up to
--max-new-tokens) in the same process, interleaved question by question so that machine
drift hits all methods alike. Speedup = method tokens/s over ar tokens/s per category
(total tokens / total decode seconds). Each method's output is checked against ar's.
Writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from firp_engine.backend import cpu_model

DEFAULT_QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def load_questions(path: Path, limit: int | None) -> list[dict]:
    per_cat: dict[str, list[dict]] = defaultdict(list)
    for line in path.read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            if limit is None or len(per_cat[q["category"]]) < limit:
                per_cat[q["category"]].append(q)
    return [q for qs in per_cat.values() for q in qs]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), None if len(a) == len(b) else n)


def parse_method(spec: str, args) -> tuple[str, dict]:
    """'firp:tree_budget=4,pseudo_policy=top:1' -> ('firp', {'tree_budget': 4, ...})."""
    name, _, rest = spec.partition(":")
    opts: dict = {}
    if name != "ar" and args.tree_budget:
        opts["tree_budget"] = args.tree_budget
    if name == "firp" and args.head:
        opts["head"] = args.head
    for item in filter(None, rest.split(",")):
        key, _, val = item.partition("=")
        flags = {"true": True, "false": False, "none": None}  # "lookup=False" must not be truthy
        opts[key] = int(val) if val.isdigit() else flags.get(val.lower(), val)
    return name, opts


def run(args) -> dict:
    from firp_engine.generate import LLM

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, backend=args.backend, weights=args.weights)
    args.weights, args.isa = llm.weights, llm.backend.isa  # "auto" resolved, for the report
    questions = load_questions(args.questions, args.limit)
    variants = {m: parse_method(m, args) for m in args.methods}
    llm.generate("Hello", max_new_tokens=8)  # warm-up
    stats: dict = defaultdict(lambda: defaultdict(lambda: {"tokens": 0, "secs": 0.0, "steps": 0, "n": 0}))
    mismatches: dict[str, list] = defaultdict(list)
    for qi, q in enumerate(questions):
        ids = llm.encode(q["turns"][0])
        outs = {}
        for m in args.methods:
            name, kw = variants[m]
            r = llm.generate(q["turns"][0], name, prompt_ids=[ids], max_new_tokens=args.max_new_tokens, **kw)[
                0
            ]
            outs[m] = r.new_ids
            for cat in (q["category"], "overall"):
                s = stats[m][cat]
                s["tokens"] += r.new_tokens
                s["secs"] += r.decode_s
                s["steps"] += r.steps
                s["n"] += 1
        for m in args.methods:
            d = first_divergence(outs[m], outs["ar"])
            if d is not None:
                mismatches[m].append({"question_id": q["question_id"], "at": d})
        print(
            f"[{qi + 1}/{len(questions)}] {q['category']}: "
            + ", ".join(
                f"{m} {stats[m]['overall']['tokens'] / max(stats[m]['overall']['secs'], 1e-9):.1f} t/s"
                for m in args.methods
            ),
            flush=True,
        )
    return summarize(args, stats, mismatches)


def summarize(args, stats, mismatches) -> dict:
    table: dict = {}
    for m, cats in stats.items():
        for cat, s in cats.items():
            tps = s["tokens"] / max(s["secs"], 1e-9)
            ar = stats["ar"][cat]
            ar_tps = ar["tokens"] / max(ar["secs"], 1e-9)
            table.setdefault(cat, {})[m] = {
                "tokens_per_s": tps,
                "speedup": tps / ar_tps,
                # tokens per verification step, bonus included (the prefill token is not a step)
                "mean_accepted": (s["tokens"] - s["n"]) / max(s["steps"], 1),
                # decode seconds per verification step, relative to a plain step
                "step_cost": (s["secs"] / max(s["steps"], 1)) / (ar["secs"] / max(ar["steps"], 1)),
                "questions": s["n"],
            }
    return {
        "machine": f"{cpu_model()}, ISA path {getattr(args, 'isa', '?')}, {args.threads} threads, "
        f"torch {torch.__version__}",
        "dtype": args.dtype,
        "weights": getattr(args, "weights", "dense"),
        "max_new_tokens": args.max_new_tokens,
        "limit_per_category": args.limit,
        "methods": args.methods,
        "table": table,
        "mismatches_vs_ar": dict(mismatches),
    }


def markdown(res: dict) -> str:
    methods = res["methods"]
    head = "| category | " + " | ".join(f"{m} speedup | {m} tau" for m in methods) + " |"
    sep = "|---|" + "---|---|" * len(methods)
    rows = []
    cats = sorted(c for c in res["table"] if c != "overall") + ["overall"]
    for c in cats:
        cells = [
            f"{res['table'][c][m]['speedup']:.2f}x | {res['table'][c][m]['mean_accepted']:.2f}"
            for m in methods
        ]
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    ar_tps = res["table"]["overall"]["ar"]["tokens_per_s"]
    foot = (
        f"\n{res['machine']}, {res['dtype']}, weights {res.get('weights', 'dense')}, greedy, "
        f"up to {res['max_new_tokens']} new tokens, "
        f"{res['limit_per_category'] or 'all'} questions per category; ar = {ar_tps:.1f} tokens/s. "
        f"Outputs differing from ar: "
        + ", ".join(f"{m}: {len(res['mismatches_vs_ar'].get(m, []))}" for m in methods if m != "ar")
    )
    overall = [
        "| method | tokens/s | speedup | tau | step cost (x ar step) | outputs != ar |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        o = res["table"]["overall"][m]
        overall.append(
            f"| {m} | {o['tokens_per_s']:.1f} | {o['speedup']:.2f}x | {o['mean_accepted']:.2f} | "
            f"{o.get('step_cost', float('nan')):.2f} | {len(res['mismatches_vs_ar'].get(m, []))} |"
        )
    return "\n".join([head, sep, *rows]) + "\n" + foot + "\n\n" + "\n".join(overall) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = sorted(c for c in res["table"] if c != "overall") + ["overall"]
    methods = [m for m in res["methods"] if m != "ar"]
    fig, ax = plt.subplots(figsize=(max(8, len(cats) * 0.9), 4))
    w = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        xs = [i + j * w for i in range(len(cats))]
        ax.bar(xs, [res["table"][c][m]["speedup"] for c in cats], w, label=m)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([i + w * (len(methods) - 1) / 2 for i in range(len(cats))], cats, rotation=40, ha="right")
    ax.set_ylabel("speedup over ar")
    ax.set_title(f"Spec-Bench, {res['dtype']}, {res['machine']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--methods", nargs="+", default=["ar", "firp", "pld"])
    ap.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    ap.add_argument("--limit", type=int, default=None, help="questions per category")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--weights", default="auto", choices=["auto", "dense", "native", "native-float"])
    ap.add_argument("--backend", default=None)
    ap.add_argument("--head", default=None, help="FIRP head (default: the shipped one)")
    ap.add_argument("--tree-budget", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/spec_bench"))
    args = ap.parse_args(argv)
    if "ar" not in args.methods:
        args.methods = ["ar", *args.methods]
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(args.out) + ".json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    Path(str(args.out) + ".md").write_text(md)
    plot(res, Path(str(args.out) + ".png"))
    print(md)


if __name__ == "__main__":
    main()
