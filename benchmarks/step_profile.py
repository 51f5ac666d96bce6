"""Where a speculative step's time goes: timers around its parts, against a plain step.

    python benchmarks/step_profile.py [--method firp] [--weights auto] [--questions 6] [--max-new-tokens 128]

Decodes every 40th Spec-Bench question (first turn, greedy) with `ar`, then with the method,
and prints ms per step for the step and its parts (forward, LM head, the drafter's propose
and its tree growth, verify + commit, the pseudo rows' projection) and the mean tree and
row counts. Prefill's forwards count in `model.forward` too; the step total does not.
A benchmark, not a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from spec_bench import DEFAULT_QUESTIONS  # noqa: E402

from firp_engine.backend import cpu_model
from firp_engine.firp import drafter, dynamic
from firp_engine.generate import LLM
from firp_engine.spec import step as stepmod

TIME: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def timed(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    def wrapper(*a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        TIME[label] += time.perf_counter() - t
        CALLS[label] += 1
        return out

    setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="firp")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    llm = LLM(dtype="bf16", weights=args.weights)
    lines = [json.loads(x) for x in DEFAULT_QUESTIONS.read_text().splitlines() if x.strip()]
    prompts = [q["turns"][0] for q in lines[::40][: args.questions]]

    def run(method: str) -> tuple[int, float]:
        res = llm.generate(prompts, method=method, max_new_tokens=args.max_new_tokens)
        return sum(r.new_tokens for r in res), sum(r.decode_s for r in res)

    llm.generate(prompts[:1], max_new_tokens=16)  # warm-up
    ar_tokens, ar_s = run("ar")
    rows = []
    forward = stepmod.SpecDecoder.forward

    def count_rows(self, states, drafts):
        for d in drafts:
            rows.append((d.tree.n, d.tree.n if d.layout is None else d.layout.n_rows))
        return forward(self, states, drafts)

    stepmod.SpecDecoder.forward = count_rows
    timed(llm.model, "forward", "model.forward")
    timed(llm.model, "logits", "model.logits")
    timed(stepmod.SpecDecoder, "step", "step")
    timed(stepmod.SpecDecoder, "verify", "verify + commit")
    timed(dynamic.DynamicFirpDrafter, "propose", "propose")
    timed(dynamic.DynamicFirpDrafter, "grow_draft", "propose: tree growth")
    timed(drafter.FirpDrafter, "extra_rows", "pseudo rows (projection)")
    tokens, decode_s = run(args.method)
    steps = CALLS["step"]
    print(f"{cpu_model()}, ISA path {llm.backend.isa}, weights {llm.weights}, bf16, {len(prompts)} prompts")
    print(f"ar: {1e3 * ar_s / ar_tokens:.3f} ms per token (step)")
    nodes, n_rows = statistics.mean(r[0] for r in rows), statistics.mean(r[1] for r in rows)
    print(f"{args.method}: {1e3 * decode_s / steps:.3f} ms per step, tau {tokens / steps:.2f}, "
          f"tree {nodes:.1f} nodes, {n_rows:.1f} rows")  # fmt: skip
    for label in sorted(TIME, key=lambda k: -TIME[k]):
        per_step, calls = 1e3 * TIME[label] / steps, CALLS[label] / steps
        print(f"  {label:26s} {per_step:7.3f} ms/step  ({calls:.2f} calls/step)")


if __name__ == "__main__":
    main()
