"""Kernel microbenchmark: the CPU C++ backend vs the PyTorch reference, per op.

Shapes are the default model's (SmolLM2-135M: d=576, 9 q heads, 3 kv heads, head_dim 64,
ffn 1536, vocab 49152) with a 1k-token context and a FIRP tree step of 16 nodes + 48
pseudo rows. Prints the measured copy bandwidth, then markdown tables (ms and GB/s, where
GB/s counts the bytes an op must read and write once):

    python benchmarks/kernel_bench.py [--dtype bf16|fp32] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import torch

from firp_engine import ops
from firp_engine.backend import Backend

D_MODEL, N_HEADS, N_KV, HEAD_DIM, FFN, VOCAB = 576, 9, 3, 64, 1536, 49152
CONTEXT, TREE_NODES, PSEUDO, BLOCK = 1024, 16, 48, 16
LINEAR_SHAPES = {  # name: (N, K) of the weight
    "q/o 576x576": (N_HEADS * HEAD_DIM, D_MODEL),
    "kv 192x576": (N_KV * HEAD_DIM, D_MODEL),
    "qkv 960x576 (fused)": ((N_HEADS + 2 * N_KV) * HEAD_DIM, D_MODEL),
    "gate_up 3072x576": (2 * FFN, D_MODEL),
    "down 576x1536": (D_MODEL, FFN),
    "lm_head 49152x576": (VOCAB, D_MODEL),
}
M_VALUES = (1, 2, 4, 8, 16, 32, 64)


def timeit(fn: Callable[[], object], min_time: float = 0.2, min_samples: int = 5) -> float:
    """Seconds per call: the fastest of many short samples (each >= ~50 us of calls), so that
    a sample the OS scheduler interrupted (e.g. on a shared machine) does not count."""
    fn()
    t0 = time.perf_counter()
    fn()
    calls = max(1, int(50e-6 / max(time.perf_counter() - t0, 1e-7)))
    best, n, end = math.inf, 0, time.perf_counter() + min_time
    while n < min_samples or time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
        n += 1
    return best


def copy_bandwidth() -> float:
    """GB/s of a 256 MiB tensor copy, counting the bytes read and written."""
    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timeit(lambda: dst.copy_(src), min_time=1.0) / 1e9


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cache(dt: torch.dtype, n_tokens: int, layers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    nb = n_tokens // BLOCK + 8
    shape = (nb, BLOCK, N_KV, HEAD_DIM) if layers is None else (layers, nb, BLOCK, N_KV, HEAD_DIM)
    return torch.randn(shape, dtype=dt), torch.randn(shape, dtype=dt)


def op_cases(dt: torch.dtype) -> list[tuple[str, str, tuple, int]]:
    """(label, op, args, bytes moved) at the default model's shapes."""
    t = TREE_NODES + PSEUDO
    x, res, w = (
        torch.randn(t, D_MODEL, dtype=dt),
        torch.randn(t, D_MODEL, dtype=dt),
        torch.randn(D_MODEL, dtype=dt),
    )
    q, k = torch.randn(t, N_HEADS, HEAD_DIM, dtype=dt), torch.randn(t, N_KV, HEAD_DIM, dtype=dt)
    pos = torch.arange(CONTEXT, CONTEXT + t)
    ang = torch.arange(4096, dtype=torch.float32)[:, None] * torch.rand(HEAD_DIM // 2)[None]
    cos, sin = ang.cos(), ang.sin()
    gu = torch.randn(t, 2 * FFN, dtype=dt)
    kc, vc = cache(dt, CONTEXT)
    pages = torch.randperm(kc.shape[0], dtype=torch.int32)
    slots = torch.arange(t) + CONTEXT
    q1 = torch.randn(1, N_HEADS, HEAD_DIM, dtype=dt)
    lens1 = torch.tensor([CONTEXT], dtype=torch.int32)
    kv_bytes = 2 * CONTEXT * N_KV * HEAD_DIM * kc.element_size()
    kc8, vc8 = cache(dt, 8 * CONTEXT)
    pages8 = torch.randperm(kc8.shape[0], dtype=torch.int32)[: 8 * (CONTEXT // BLOCK)].view(8, -1)
    q8, lens8 = torch.randn(8, N_HEADS, HEAD_DIM, dtype=dt), torch.full((8,), CONTEXT, dtype=torch.int32)
    kn, vn = torch.randn(t, N_KV, HEAD_DIM, dtype=dt), torch.randn(t, N_KV, HEAD_DIM, dtype=dt)
    mask = ops.pack_mask(torch.tril(torch.ones(t, t, dtype=torch.bool)))
    h, pw, pb = torch.randn(TREE_NODES, D_MODEL, dtype=dt), torch.randn(3, D_MODEL, D_MODEL, dtype=dt), None
    kcl, vcl = cache(dt, 2 * t, layers=30)
    ks, vs = torch.randn(30, t, N_KV, HEAD_DIM, dtype=dt), torch.randn(30, t, N_KV, HEAD_DIM, dtype=dt)
    src, dst = torch.tensor([0, 3, 9, 20]), torch.arange(4) + t
    scale = HEAD_DIM**-0.5
    return [
        (f"rms_norm [{t}, 576]", "rms_norm", (x, w, 1e-5), 2 * nbytes(x)),
        (f"add_rms_norm [{t}, 576]", "add_rms_norm", (x, res, w, 1e-5), 4 * nbytes(x)),
        (f"rope {t} tokens", "rope", (q, k, pos, cos, sin), 2 * nbytes(q, k)),
        (f"silu_mul [{t}, 3072]", "silu_mul", (gu,), nbytes(gu) * 3 // 2),
        (f"write_kv {t} rows", "write_kv", (kc, vc, kn, vn, slots), 2 * nbytes(kn, vn)),
        (
            "decode attn B=1, 1k ctx",
            "paged_decode_attention",
            (q1, kc, vc, pages[None], lens1, scale),
            kv_bytes,
        ),
        (
            "decode attn B=8, 1k ctx",
            "paged_decode_attention",
            (q8, kc8, vc8, pages8, lens8, scale),
            8 * kv_bytes,
        ),
        (
            f"tree attn {TREE_NODES}+{PSEUDO} rows, 1k ctx",
            "tree_attention",
            (q, kc, vc, pages, CONTEXT, kn, vn, mask, scale),
            kv_bytes + nbytes(q, kn, vn, q),
        ),
        (f"firp_project n={TREE_NODES}, k=3", "firp_project", (h, pw, pb), nbytes(pw)),
        (
            "kv_commit 30 layers, 4 rows",
            "kv_commit",
            (kcl, vcl, ks, vs, src, dst),
            2 * 2 * 30 * 4 * N_KV * HEAD_DIM * kcl.element_size(),
        ),
    ]


def bench_ops(dt: torch.dtype, b: Backend) -> list[dict]:
    rows = []
    for label, op, args, moved in op_cases(dt):
        if op in b.fallbacks:
            continue  # no kernel: it would time the reference against itself
        ref = timeit(lambda op=op, args=args: ops.REFERENCES[op](*args))
        fast = timeit(lambda op=op, args=args: b.op(op)(*args))
        rows.append(
            {
                "op": label,
                "torch_ms": ref * 1e3,
                f"{b.name}_ms": fast * 1e3,
                "speedup": ref / fast,
                "torch_GBps": moved / ref / 1e9,
                f"{b.name}_GBps": moved / fast / 1e9,
            }
        )
    return rows


def bench_linear(dt: torch.dtype, b: Backend) -> list[dict]:
    rows = []
    for name, (n, k) in LINEAR_SHAPES.items():
        w = torch.randn(n, k, dtype=dt) / math.sqrt(k)
        packed = b.op("pack_linear")(w)
        lin = b.op("linear")
        for m in M_VALUES:
            x = torch.randn(m, k, dtype=dt)
            # the reference gets fewer repeats: its bf16 path is slow on large M
            ref = timeit(lambda x=x, w=w: ops.linear(x, w, w), min_time=0.05, min_samples=3)
            fast = timeit(lambda x=x, w=w, p=packed, f=lin: f(x, w, p))
            rows.append(
                {
                    "weight": name,
                    "M": m,
                    "torch_ms": ref * 1e3,
                    f"{b.name}_ms": fast * 1e3,
                    "torch_GBps": nbytes(w) / ref / 1e9,
                    f"{b.name}_GBps": nbytes(w) / fast / 1e9,
                }
            )
    return rows


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v: object) -> str:
        if not isinstance(v, float):
            return str(v)
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--skip-linear", action="store_true", help="only the per-op table")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    chosen = Backend.create(args.backend)  # FirpError: not available here
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    isa = chosen.isa or ""
    bw = copy_bandwidth()
    print(
        f"# kernels: {args.backend} ({isa}) vs torch, {args.dtype}, {args.threads} threads, "
        f"copy bandwidth {bw:.1f} GB/s\n"
    )
    op_rows = bench_ops(dt, chosen)
    b = args.backend
    print(table(op_rows, ["op", "torch_ms", f"{b}_ms", "speedup", "torch_GBps", f"{b}_GBps"]))
    lin_rows = [] if args.skip_linear or "linear" in chosen.fallbacks else bench_linear(dt, chosen)
    if lin_rows:
        for r in lin_rows:
            r["pct_of_copy_bw"] = 100 * r[f"{b}_GBps"] / bw
        print(
            "\n"
            + table(
                lin_rows, ["weight", "M", "torch_ms", f"{b}_ms", "torch_GBps", f"{b}_GBps", "pct_of_copy_bw"]
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "backend": b,
                    "isa": isa,
                    "dtype": args.dtype,
                    "threads": args.threads,
                    "copy_GBps": bw,
                    "ops": op_rows,
                    "linear": lin_rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
