"""Step cost against rows, per SIMD path: what a speculative step with R rows costs.

    python benchmarks/step_cost.py [--paths avx2 avx512bf16] [--threads 2] [--dtype bf16]
                                   [--weights auto|dense|native] [--json out.json]

For each cpu path this machine runs (default: all but the portable one), on the default model:
the whole step (a tree forward of R rows over a 256-token prefix, then the LM head: what the
draft budget reads, `firp/budget.py: measure`) and each GEMM shape alone, at R = 1 ... 64, in
ms and relative to R = 1. The weight-bandwidth floor of one row (weight bytes / copy bandwidth,
both measured here) is printed beside it. Paths run one after the other in one process.
With native weights (the default for the GGUF in bf16), the GEMM shapes are timed on random
GGUF blocks of the default file's kinds: Q8_0 for the tied LM head, Q4_1 for the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_bench import LINEAR_SHAPES, copy_bandwidth, timeit  # noqa: E402

from firp_engine.backend import (  # noqa: E402
    Backend,
    available_backends,
    cpu_model,  # noqa: E402
)
from firp_engine.firp.budget import ROWS, measure  # noqa: E402
from firp_engine.generate import LLM  # noqa: E402
from firp_engine.quant import BLOCK, BLOCK_BYTES, QuantWeight  # noqa: E402


def random_blocks(kind: str, n: int, k: int) -> QuantWeight:
    """Random GGUF blocks with fp16 scales of a realistic size (what a kernel reads, not a model)."""
    raw = torch.randint(0, 256, (n, k // BLOCK, BLOCK_BYTES[kind]), dtype=torch.uint8)
    for i in range(2 if kind == "Q4_1" else 1):
        scale = (torch.rand(n, k // BLOCK) * 0.02).half()
        raw[..., 2 * i : 2 * i + 2] = scale.unsqueeze(-1).view(torch.uint8)
    return QuantWeight(kind, (n, k), raw.reshape(n, -1))


def gemm_ms(backend: Backend, dtype: torch.dtype, native: bool) -> dict[str, dict[int, float]]:
    pack, linear = backend.op("pack_linear"), backend.op("linear")
    out = {}
    for name, (n, k) in LINEAR_SHAPES.items():
        kind = "Q8_0" if name.startswith("lm_head") else "Q4_1"
        w = random_blocks(kind, n, k) if native else torch.randn(n, k).to(dtype)
        packed = pack(w)
        name = f"{name} {kind}" if native else name
        out[name] = {}
        for m in ROWS:
            x = torch.randn(m, k).to(dtype)
            meta = torch.empty(n, k, device="meta")  # the kernel reads the pack only
            out[name][m] = 1e3 * timeit(lambda x=x, w=meta, packed=packed: linear(x, w, packed))
    return out


def table(title: str, rows: dict[str, dict[int, float]]) -> str:
    head = "| " + title + " | " + " | ".join(f"R={r}" for r in ROWS) + " | R=16 / R=1 |"
    lines = [head, "|---" * (len(ROWS) + 2) + "|"]
    for name, ms in rows.items():
        cells = " | ".join(f"{ms[r]:.3f}" for r in ROWS)
        lines.append(f"| {name} | {cells} | {ms[16] / ms[1]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--weights", default="auto", choices=["auto", "dense", "native"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runnable = [n.split("@")[1] for n in available_backends() if n.startswith("cpu@")]
    paths = args.paths or [p for p in runnable if p != "scalar"] or runnable
    bw = copy_bandwidth()
    print(f"{cpu_model()}, {args.threads} threads, {args.dtype}, copy bandwidth {bw:.1f} GB/s\n")
    results = {"cpu": cpu_model(), "threads": args.threads, "dtype": args.dtype, "copy_GBps": bw, "paths": {}}
    for path in paths:
        llm = LLM(None, dtype=args.dtype, backend=f"cpu@{path}", threads=args.threads, weights=args.weights)
        native = llm.weights.startswith("native")
        floor_ms = llm.model.step_bytes() / (bw * 1e9) * 1e3  # the packed weights a step streams
        step = measure(llm, reps=7)
        gemms = gemm_ms(llm.backend, llm.model.dtype, native)
        results["paths"][path] = {
            "step_ms": step,
            "gemm_ms": gemms,
            "floor_ms": floor_ms,
            "weights": llm.weights,
        }
        print(
            f"## path {path}, {llm.weights} weights: one-row weight floor {floor_ms:.2f} ms"
            " (packed weights / copy bandwidth)\n"
        )
        print(table("whole step, ms", {"tree forward + LM head": step}))
        print()
        print(table("GEMM, ms (cache-hot)", gemms))
        print()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
