"""How right FIRP's drafts are on Spec-Bench, and how calibrated their probabilities.

    python benchmarks/draft_calibration.py [--dtype bf16] [--weights auto] [--every 20] [--questions 13]

Decodes every `--every`-th Spec-Bench question with FIRP alone (dynamic tree, no lookup) and,
for each step, follows the chain of the pseudo rows' top-1 drafts: at depth t, the predicted
value (product of their softmax probabilities) against whether all t were the tokens the
model then produced. Prints mean predicted vs accepted per depth, and accepted per bin.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from spec_bench import DEFAULT_QUESTIONS  # noqa: E402

from firp_engine.firp import dynamic
from firp_engine.generate import LLM, State
from firp_engine.spec.step import SpecDecoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--questions", type=int, default=13)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    args = ap.parse_args()
    llm = LLM(dtype=args.dtype, weights=args.weights)
    lines = [json.loads(x) for x in DEFAULT_QUESTIONS.read_text().splitlines() if x.strip()]
    prompts = [q["turns"][0] for q in lines[:: args.every][: args.questions]]
    grow = dynamic.DynamicFirpDrafter.grow_draft

    def logged(self, st, firp, chain):  # the step's per-offset top candidates, by root index
        st.extra.setdefault("firp_log", []).append((len(st.tokens), [row[:1] for row in firp]))
        return grow(self, st, firp, chain)

    dynamic.DynamicFirpDrafter.grow_draft = logged
    drafter = dynamic.DynamicFirpDrafter(llm, lookup=False)
    dec = SpecDecoder(llm, drafter)
    depth = defaultdict(lambda: [0.0, 0, 0])  # t -> sum predicted, accepted, count
    bins = defaultdict(lambda: [0, 0])  # (t, bin) -> accepted, count
    eos = set(llm.config.eos_ids)
    with torch.inference_mode():
        for p in prompts:
            ids = llm.encode(p)
            seq = llm.cache.new_sequence()
            st = State(seq, list(ids), len(ids))
            st.tokens += dec.prefill(st)
            while len(st.tokens) - len(ids) < args.max_new_tokens and not eos & set(st.tokens[len(ids) :]):
                st.tokens += dec.step([st])[0]
            seq.free()
            for pos, rows in st.extra.get("firp_log", []):
                v, ok = 1.0, True
                for t, row in enumerate(rows, 1):
                    if pos + t - 1 >= len(st.tokens) or not row:
                        break
                    tok, prob = row[0]
                    v, ok = v * prob, ok and tok == st.tokens[pos + t - 1]
                    d = depth[t]
                    d[0], d[1], d[2] = d[0] + v, d[1] + ok, d[2] + 1
                    b = bins[(t, min(int(v * 5), 4))]
                    b[0], b[1] = b[0] + ok, b[1] + 1
    print(f"{args.dtype}, weights {llm.weights}, {len(prompts)} questions")
    for t, (pv, acc, n) in sorted(depth.items()):
        print(f"depth {t}: mean predicted {pv / n:.3f}, accepted {acc / n:.3f} ({n} chains)")
    for (t, b), (acc, n) in sorted(bins.items()):
        print(f"  depth {t}, predicted [{b / 5:.1f}, {b / 5 + 0.2:.1f}): accepted {acc / n:.3f} ({n})")


if __name__ == "__main__":
    main()
