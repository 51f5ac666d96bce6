"""Attention microbenchmarks on a GPU: paged decode and tree attention at LLaMA-2-7B and
LLaMA-3-8B shapes, for every GPU backend that loads (cuda, triton), against the card's
measured copy bandwidth and torch SDPA with a dense mask. Prints a markdown table.

    python benchmarks/gpu_bench.py                 # on a CUDA machine
    python benchmarks/gpu_bench.py --jit           # build csrc/cuda with torch's JIT loader if
                                                   # firp_engine._C lacks the CUDA kernels
    python benchmarks/gpu_bench.py --dry-run       # CPU, tiny shapes: checks the script itself

What is measured: one layer, bf16. Each timed call runs after an L2 flush (unless
--no-flush), so GB/s is DRAM traffic: the K/V bytes the op must read (each kv head's rows
once) plus q and out. SDPA gets contiguous K/V that were gathered from the pages beforehand
(not timed) and a dense boolean mask, i.e. a favourable baseline: it skips the paging.
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from firp_engine import ops  # noqa: E402
from firp_engine.backend import Backend, available_backends  # noqa: E402

MODELS = {"LLaMA-2-7B": (32, 32, 128), "LLaMA-3-8B": (32, 8, 128)}  # heads, kv heads, head dim
TINY_MODELS = {"tiny-MHA": (4, 4, 64), "tiny-GQA": (4, 1, 64)}
BLOCK_SIZE = 16


@dataclass
class Row:
    op: str
    model: str
    context: int
    shape: str  # batch for decode, tree rows for tree attention
    impl: str
    us: float
    bytes: int
    sdpa_us: float
    err: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="cuda,triton", help="comma list of GPU backends to time")
    p.add_argument("--contexts", default="1024,4096,16384", help="comma list of context lengths")
    p.add_argument("--batches", default="1,8", help="comma list of decode batch sizes")
    p.add_argument("--tree-nodes", type=int, default=8, help="tree nodes per step")
    p.add_argument("--pseudo", type=int, default=3, help="FIRP pseudo rows per node (k)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--no-flush", action="store_true", help="do not flush L2 before each timed call")
    p.add_argument(
        "--jit", action="store_true", help="JIT-build csrc/cuda if firp_engine._C has no cuda_ ops"
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, torch reference as the kernel")
    return p.parse_args(argv)


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


# ---------------------------------------------------------------- backends


def jit_build_cuda_ops() -> None:
    """Compile csrc/cuda with torch's extension loader and install it as firp_engine._C
    (only the cuda_ ops: enough for the cuda backend; the cpu backend then stays absent)."""
    from torch.utils.cpp_extension import load

    src = ROOT / "csrc" / "cuda"
    build = ROOT / "build" / "jit_cuda"
    build.mkdir(parents=True, exist_ok=True)
    main = build / "module.cpp"
    main.write_text(
        '#include <torch/extension.h>\n#include "launchers.h"\n'
        "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { register_cuda(m); }\n"
    )
    sources = [str(main), str(src / "bindings_cuda.cpp"), *map(str, sorted(src.glob("*.cu")))]
    mod = load(
        name="firp_cuda_jit",
        sources=sources,
        extra_include_paths=[str(src)],
        extra_cuda_cflags=["-O3"],
        build_directory=str(build),
        verbose=False,
    )
    import firp_engine

    sys.modules["firp_engine._C"] = mod
    firp_engine._C = mod


def has_cuda_ops() -> bool:
    try:
        mod = importlib.import_module("firp_engine._C")
    except ImportError:
        return False
    return hasattr(mod, "cuda_paged_decode_attention")


def implementations(args: argparse.Namespace) -> dict[str, Backend]:
    """impl name -> the backend whose paged_decode/tree_attention are timed."""
    if args.dry_run:
        return {"torch-ref": Backend.create("torch")}
    if args.jit and "cuda" in args.backends.split(",") and not has_cuda_ops():
        print("firp_engine._C has no CUDA ops: building csrc/cuda with the JIT loader ...", flush=True)
        jit_build_cuda_ops()
    available = available_backends()
    chosen = {}
    for name in args.backends.split(","):
        if name in available:
            chosen[name] = Backend.create(name)
        else:
            print(f"note: backend '{name}' is not available here; skipped", flush=True)
    return chosen


# ---------------------------------------------------------------- timing


class Timer:
    """Median time of fn() in microseconds; on CUDA with events, optionally after an L2 flush."""

    def __init__(self, device: torch.device, iters: int, warmup: int, flush: bool):
        self.device, self.iters, self.warmup = device, iters, warmup
        self.flush_buf = None
        if device.type == "cuda" and flush:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
            self.flush_buf = torch.empty(4 * l2, dtype=torch.uint8, device=device)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            if self.device.type == "cuda":
                if self.flush_buf is not None:
                    self.flush_buf.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written)."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src))
    return 2 * n / (us * 1e-6) / 1e9


# ---------------------------------------------------------------- inputs


def paged_cache(n_tokens: list[int], kv_heads: int, head_dim: int, dtype, device):
    """Random K/V in shuffled pages; returns (k_cache, v_cache, page_tables int32 [B, P])."""
    pages = [math.ceil(n / BLOCK_SIZE) for n in n_tokens]
    width = max(pages)
    nb = sum(pages) + 1
    k_cache = torch.randn(nb, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(nb, device=device).to(torch.int32)
    table = torch.zeros(len(n_tokens), width, dtype=torch.int32, device=device)
    at = 0
    for b, n in enumerate(pages):
        table[b, :n] = perm[at : at + n]
        at += n
    return k_cache, v_cache, table


def gather(cache: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """[n, Hkv, D] of one sequence -> [Hkv, n, D] contiguous, for SDPA."""
    return ops.gather_pages(cache, table, n).transpose(0, 1).contiguous()


def tree_mask(nodes: int, pseudo: int, device) -> torch.Tensor:
    """bool [T, T] over the step's rows: a random tree of `nodes` (each sees its ancestors and
    itself), then `pseudo` rows per node that see the node's ancestors, the node and their
    own earlier pseudo rows."""
    parent = [-1] + [int(torch.randint(0, i, ()).item()) for i in range(1, nodes)]
    t = nodes * (1 + pseudo)
    allowed = torch.zeros(t, t, dtype=torch.bool)
    for i in range(nodes):
        j = i
        while j >= 0:
            allowed[i, j] = True
            j = parent[j]
        for s in range(pseudo):
            r = nodes + i * pseudo + s
            allowed[r] = allowed[i]
            allowed[r, nodes + i * pseudo : r + 1] = True
    return allowed.to(device)


def sdpa(q, k, v, mask, scale):
    """q [B, H, T, D], k/v [B, Hkv, S, D], mask bool broadcastable to [B, H, T, S]."""
    if k.shape[1] != q.shape[1]:
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        except TypeError:  # torch < 2.5: expand the kv heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------- cases


def bench_decode(model, shape, ctx, batch, impls, timer, dtype, device) -> list[Row]:
    heads, kv_heads, d = shape
    scale = d**-0.5
    k_cache, v_cache, table = paged_cache([ctx] * batch, kv_heads, d, dtype, device)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, d, dtype=dtype, device=device)
    ref = ops.paged_decode_attention(q, k_cache, v_cache, table, lens, scale)

    kd = torch.stack([gather(k_cache, table[b], ctx) for b in range(batch)])
    vd = torch.stack([gather(v_cache, table[b], ctx) for b in range(batch)])
    mask = torch.ones(batch, 1, 1, ctx, dtype=torch.bool, device=device)
    qd = q.unsqueeze(2)
    sdpa_us = timer(lambda: sdpa(qd, kd, vd, mask, scale))

    elt = q.element_size()
    nbytes = 2 * batch * ctx * kv_heads * d * elt + 2 * q.numel() * elt
    rows = []
    for name, backend in impls.items():
        if "paged_decode_attention" in backend.fallbacks:
            continue  # the backend lacks this op (it would time the reference)
        fn = backend.op("paged_decode_attention")
        out = torch.empty_like(q)
        us = timer(lambda fn=fn, out=out: fn(q, k_cache, v_cache, table, lens, scale, out=out))
        err = max_err(fn(q, k_cache, v_cache, table, lens, scale), ref)
        rows.append(Row("paged decode", model, ctx, f"B={batch}", name, us, nbytes, sdpa_us, err))
    return rows


def bench_tree(model, shape, ctx, nodes, pseudo, impls, timer, dtype, device) -> list[Row]:
    heads, kv_heads, d = shape
    scale = d**-0.5
    allowed = tree_mask(nodes, pseudo, device)
    t = allowed.shape[0]
    k_cache, v_cache, table = paged_cache([ctx], kv_heads, d, dtype, device)
    table = table[0]
    q = torch.randn(t, heads, d, dtype=dtype, device=device)
    k_new = torch.randn(t, kv_heads, d, dtype=dtype, device=device)
    v_new = torch.randn_like(k_new)
    bits = ops.pack_mask(allowed)
    ref = ops.tree_attention(q, k_cache, v_cache, table, ctx, k_new, v_new, bits, scale)

    kd = torch.cat([gather(k_cache, table, ctx), k_new.transpose(0, 1)], dim=1).unsqueeze(0)
    vd = torch.cat([gather(v_cache, table, ctx), v_new.transpose(0, 1)], dim=1).unsqueeze(0)
    dense = torch.cat([torch.ones(t, ctx, dtype=torch.bool, device=device), allowed], dim=1)
    qd = q.transpose(0, 1).unsqueeze(0)
    sdpa_us = timer(lambda: sdpa(qd, kd, vd, dense, scale))

    elt = q.element_size()
    nbytes = 2 * (ctx + t) * kv_heads * d * elt + 2 * q.numel() * elt + bits.numel() * 8
    rows = []
    for name, backend in impls.items():
        if "tree_attention" in backend.fallbacks:
            continue
        fn = backend.op("tree_attention")
        out = torch.empty_like(q)
        us = timer(
            lambda fn=fn, out=out: fn(q, k_cache, v_cache, table, ctx, k_new, v_new, bits, scale, out=out)
        )
        err = max_err(fn(q, k_cache, v_cache, table, ctx, k_new, v_new, bits, scale), ref)
        rows.append(Row("tree attention", model, ctx, f"T={t}", name, us, nbytes, sdpa_us, err))
    return rows


def table(rows: list[Row], copy_gbs: float, tol: float) -> str:
    lines = [
        "| op | model | context | shape | impl | time us | GB/s | % copy BW "
        "| SDPA dense-mask us | speedup vs SDPA | max err |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gbs = r.bytes / (r.us * 1e-6) / 1e9
        flag = "" if r.err <= tol else " (!)"
        lines.append(
            f"| {r.op} | {r.model} | {r.context} | {r.shape} | {r.impl} | {r.us:.1f} | {gbs:.0f} | "
            f"{100 * gbs / copy_gbs:.0f}% | {r.sdpa_us:.1f} | {r.sdpa_us / r.us:.2f}x | {r.err:.2g}{flag} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        device, dtype, models = torch.device("cpu"), torch.float32, TINY_MODELS
        contexts, batches, args.iters, args.warmup = [64, 200], [1, 2], 1, 0
        nodes, pseudo = 3, 2
    else:
        if not torch.cuda.is_available():
            print("no CUDA device (use --dry-run to check the script on a CPU)", file=sys.stderr)
            return 2
        device, dtype, models = torch.device("cuda"), getattr(torch, args.dtype), MODELS
        contexts, batches = ints(args.contexts), ints(args.batches)
        nodes, pseudo = args.tree_nodes, args.pseudo
    torch.manual_seed(0)
    impls = implementations(args)
    if not impls:
        print("no backend to time", file=sys.stderr)
        return 2
    timer = Timer(device, args.iters, args.warmup, flush=not args.no_flush)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    copy_gbs = copy_bandwidth(device, timer)
    print(
        f"\n## {name}: measured copy bandwidth {copy_gbs:.0f} GB/s, dtype {dtype}, "
        f"L2 flush {'off' if args.no_flush or device.type != 'cuda' else 'on'}\n",
        flush=True,
    )

    rows: list[Row] = []
    for model, shape in models.items():
        for ctx in contexts:
            for batch in batches:
                rows += bench_decode(model, shape, ctx, batch, impls, timer, dtype, device)
            rows += bench_tree(model, shape, ctx, nodes, pseudo, impls, timer, dtype, device)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    print(table(rows, copy_gbs, tol))
    bad = [r for r in rows if not r.err <= tol]
    if bad:
        print(f"\n{len(bad)} result(s) differ from the torch reference by more than {tol} (marked (!))")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
