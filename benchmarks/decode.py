"""Plain greedy decode speed: this engine vs transformers, fp32 and bf16, vs the bandwidth floor.

    python benchmarks/decode.py [--threads 2] [--new-tokens 128] [--backends cpu torch] [--json out.json]

Per-token decode time excludes prefill on both sides (ours: decode_s / steps; transformers:
(time for N tokens - time for 1 token) / (N - 1)). The floor is the weight bytes one step
must read divided by the measured copy bandwidth (bytes read + written per second).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

PROMPTS = [
    "Explain how a paged KV cache works in an inference engine.",
    "Write a short story about a robot learning to paint.",
    "What are the main differences between Python lists and tuples?",
]


def copy_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """GB/s of a large tensor copy, counting read + write traffic."""
    src = torch.empty(mb * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def weight_bytes(llm) -> int:
    """Bytes of weights one decode step streams (all linears + LM head + norms; one embedding row)."""
    m = llm.model
    total = m.lm_head.kernel_args()[0].numel() + m.norm.numel()  # the weight or its meta stand-in
    for lw in m.layers:
        total += sum(x.kernel_args()[0].numel() for x in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down))
        total += lw.attn_norm.numel() + lw.ffn_norm.numel()
    return total * m.embed.element_size()


def bench_ours(dtype: str, backend: str, new_tokens: int) -> dict:
    from firp_engine.generate import LLM

    llm = LLM(None, dtype=dtype, backend=backend)
    llm.generate(PROMPTS[0], max_new_tokens=8)  # warm-up (packing, allocator)
    res = [llm.generate(p, max_new_tokens=new_tokens)[0] for p in PROMPTS]
    steps = sum(r.steps for r in res)
    secs = sum(r.decode_s for r in res)
    return {"ms_per_token": 1e3 * secs / steps, "weight_bytes": weight_bytes(llm)}


def bench_hf(dtype: str, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from firp_engine.loading import default_model_path

    p = default_model_path()
    tdt = torch.float32 if dtype == "fp32" else torch.bfloat16
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=tdt).eval()
    per_token = []
    for prompt in PROMPTS:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]

        def run(n: int, ids=ids) -> tuple[float, int]:
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            return time.perf_counter() - t, out.shape[1] - ids.shape[1]

        run(4)
        t1, _ = run(1)
        tn, n = run(new_tokens)
        per_token.append((tn - t1) / (n - 1))
    return {"ms_per_token": 1e3 * sum(per_token) / len(per_token)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--backends", nargs="+", default=["cpu", "torch"])
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = copy_bandwidth()
    rows = []
    for dtype in args.dtypes:
        hf = None if args.no_hf else bench_hf(dtype, args.new_tokens)["ms_per_token"]
        for backend in args.backends:
            ours = bench_ours(dtype, backend, args.new_tokens)
            floor = ours["weight_bytes"] / (bw * 1e9) * 1e3
            rows.append(
                {
                    "dtype": dtype,
                    "backend": backend,
                    "ours_ms": ours["ms_per_token"],
                    "hf_ms": hf,
                    "floor_ms": floor,
                    "weight_MB": ours["weight_bytes"] / 1e6,
                }
            )
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"copy bandwidth {bw:.1f} GB/s, torch {torch.__version__}\n"
    )
    print(
        "| dtype | backend | ours ms/tok | ours tok/s | transformers ms/tok | tok/s | ours vs HF "
        "| floor ms | ours / floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hf = r["hf_ms"]
        vs_hf = f"{hf:.1f} | {1e3 / hf:.1f} | {hf / r['ours_ms']:.2f}x" if hf else "- | - | -"
        print(
            f"| {r['dtype']} | {r['backend']} | {r['ours_ms']:.1f} | {1e3 / r['ours_ms']:.1f} | {vs_hf} | "
            f"{r['floor_ms']:.1f} | {r['ours_ms'] / r['floor_ms']:.2f}x |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"bandwidth_GBps": bw, "threads": args.threads, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
