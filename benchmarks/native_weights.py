"""Weight formats of the default GGUF, one run: decode speed of `ar` and `firp` with the weights
dequantized to bf16 (dense) and kept as Q4_1/Q8_0 blocks (native: 8-bit activations; native-float:
exact fp32 activations), against each format's weight-bandwidth floor.

    python benchmarks/native_weights.py [--threads 2] [--tokens 128] [--rounds 2] [--json out.json]

Formats alternate round by round in one process; the figure is decode ms per token (prefill
excluded), the best round. Floor = the packed weight bytes one step streams / the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from before_after import PROMPTS  # noqa: E402
from kernel_bench import copy_bandwidth  # noqa: E402

from firp_engine.backend import cpu_model  # noqa: E402
from firp_engine.generate import LLM  # noqa: E402
from firp_engine.loading import load  # noqa: E402

FORMATS = ("dense", "native", "native-float")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["ar", "firp"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llms = {f: LLM(load(None, weights=f), dtype="bf16", backend="cpu", threads=args.threads) for f in FORMATS}
    bw = copy_bandwidth()
    best: dict[tuple[str, str], float] = {}
    tau: dict[tuple[str, str], float] = {}
    for llm in llms.values():
        llm.generate("Hello", max_new_tokens=8)  # warm-up
    for _ in range(args.rounds):
        for fmt, llm in llms.items():
            for method in args.methods:
                secs = toks = steps = 0
                for p in PROMPTS:
                    r = llm.generate(p, method, max_new_tokens=args.tokens)[0]
                    secs, toks, steps = secs + r.decode_s, toks + r.new_tokens - 1, steps + r.steps
                ms = 1e3 * secs / toks
                best[fmt, method] = min(best.get((fmt, method), ms), ms)
                tau[fmt, method] = toks / max(steps, 1)
    isa = llms["dense"].backend.isa
    lines = [
        f"{cpu_model()}, path {isa}, {args.threads} threads, bf16 activations (native-float: fp32 inside "
        f"the kernel), batch 1, greedy, {len(PROMPTS)} prompts x {args.tokens} tokens, "
        f"copy bandwidth {bw:.1f} GB/s",
        "",
        "| weights | MiB per step | floor ms | "
        + " | ".join(f"{m} ms/token | {m} x floor" for m in args.methods)
        + " |",
        "|---" * (3 + 2 * len(args.methods)) + "|",
    ]
    out = {"cpu": cpu_model(), "isa": isa, "threads": args.threads, "copy_GBps": bw, "rows": {}}
    for fmt, llm in llms.items():
        nbytes = llm.model.step_bytes()
        floor = nbytes / (bw * 1e9) * 1e3
        cells = " | ".join(f"{best[fmt, m]:.2f} | {best[fmt, m] / floor:.2f}" for m in args.methods)
        lines.append(f"| {fmt} | {nbytes / 2**20:.0f} | {floor:.2f} | {cells} |")
        out["rows"][fmt] = {"bytes": nbytes, "floor_ms": floor, **{m: best[fmt, m] for m in args.methods}}
        out["rows"][fmt]["tokens_per_step"] = {m: tau[fmt, m] for m in args.methods}
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
