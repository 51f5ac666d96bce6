"""`firp serve` under concurrent clients: aggregate throughput, time to first token and
inter-token latency, per method and number of concurrent clients.

    python benchmarks/serve_bench.py [--model PATH] [--dtype bf16] [--concurrency 1 4 8]
        [--methods ar firp] [--firp-concurrency 4] [--requests 3] [--max-tokens 128]
        [--out benchmarks/results/serve_bench]

Each method gets its own `firp serve` process on loopback (--max-batch = the largest
concurrency, so that every client decodes at once). At each concurrency level, c clients
(the official openai client, asyncio) each send --requests streamed chat requests one after
another: Spec-Bench first turns, greedy, up to --max-tokens new tokens. Throughput =
completion tokens of all requests / the level's wall time. TTFT = request sent -> first
content chunk; inter-token latency = (last chunk - first chunk) / (tokens - 1) per request
(a speculative step streams several tokens in one chunk). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI
from spec_bench import DEFAULT_QUESTIONS, load_questions

from firp_engine.backend import cpu_model


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def start_server(args, method: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = {
        "model": args.model, "backend": args.backend, "threads": args.threads, "dtype": args.dtype,
        "method": method, "port": port, "max_batch": max(args.concurrency + args.firp_concurrency),
        "max_queue": 1024, "served_model_name": "bench",
    }  # fmt: skip
    if method != "ar":
        opts.update(head=args.head, tree_budget=args.tree_budget)
    cmd = [sys.executable, "-m", "firp_engine.cli", "serve"]
    for key, value in opts.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    log = tempfile.TemporaryFile("w+")  # its access log: a pipe nobody reads would fill up
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 600
    while time.monotonic() < end:
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"firp serve exited: {log.read()}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("firp serve did not start in 10 minutes")


async def one_request(client, prompt: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    stream = await client.chat.completions.create(
        model="bench",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = last = None
    tokens = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    itl = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return {"tokens": tokens, "ttft": None if first is None else first - sent, "itl": itl}


async def level(url: str, prompts: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    """clients concurrent clients, each sending `requests` requests in turn."""
    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)

    async def worker(c: int) -> list[dict]:
        return [
            await one_request(client, prompts[(c * requests + i) % len(prompts)], max_tokens)
            for i in range(requests)
        ]

    t = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
    wall = time.perf_counter() - t
    await client.close()
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [r["itl"] for r in results if r["itl"] is not None]
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50),
        "ttft_p95_ms": 1e3 * percentile(ttft, 95),
        "itl_p50_ms": 1e3 * percentile(itl, 50),
        "itl_p95_ms": 1e3 * percentile(itl, 95),
    }


def mean_accepted(url: str, method: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'firp_mean_accepted_tokens{{method="{method}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def run(args) -> dict:
    prompts = [q["turns"][0] for q in load_questions(args.questions, args.limit)]
    plan = {"ar": args.concurrency, "firp": args.firp_concurrency}
    res: dict = {
        "cpu": cpu_model(),
        "dtype": args.dtype,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests,
        "methods": {},
    }
    for method in args.methods:
        proc, url = start_server(args, method)
        try:
            asyncio.run(level(url, prompts, 1, 1, 8))  # warm-up
            levels = []
            for c in plan.get(method, args.concurrency):
                levels.append(asyncio.run(level(url, prompts, c, args.requests, args.max_tokens)))
                print(f"{method} x{c}: {levels[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
            res["methods"][method] = {"levels": levels, "mean_accepted": mean_accepted(url, method)}
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    return res


def markdown(res: dict) -> str:
    rows = [
        "| method | clients | tokens/s | TTFT p50 / p95 (ms) | ITL p50 / p95 (ms) |",
        "|---|---|---|---|---|",
    ]
    tps: dict = {}
    for method, r in res["methods"].items():
        for lv in r["levels"]:
            tps[method, lv["clients"]] = lv["tokens_per_s"]
            rows.append(
                f"| {method} | {lv['clients']} | {lv['tokens_per_s']:.1f} | {lv['ttft_p50_ms']:.0f} / "
                f"{lv['ttft_p95_ms']:.0f} | {lv['itl_p50_ms']:.1f} / {lv['itl_p95_ms']:.1f} |"
            )
    notes = [
        f"\n{res['cpu']}, {res['dtype']}, {res['threads'] or 'default'} threads, greedy, "
        f"{res['max_tokens']} tokens x {res['requests_per_client']} requests per client."
    ]
    clients = sorted({c for _, c in tps})
    if ("ar", 1) in tps:
        notes += [
            f"ar at {c} clients: {tps['ar', c] / tps['ar', 1]:.2f}x ar at 1"
            for c in clients[1:]
            if ("ar", c) in tps
        ]
    notes += [
        f"firp at {c} clients: {tps['firp', c] / tps['ar', c]:.2f}x ar at {c} (mean accepted "
        f"{res['methods']['firp']['mean_accepted']:.2f} tokens/step)"
        for c in clients
        if ("firp", c) in tps and ("ar", c) in tps
    ]
    return "\n".join(rows + notes) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--backend", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--head", default=None, help="FIRP head (default: the shipped one)")
    ap.add_argument("--tree-budget", type=int, default=None)
    ap.add_argument("--methods", nargs="+", default=["ar", "firp"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="ar's levels")
    ap.add_argument("--firp-concurrency", type=int, nargs="+", default=[4], help="firp's levels")
    ap.add_argument("--requests", type=int, default=3, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    ap.add_argument("--limit", type=int, default=None, help="questions per Spec-Bench category")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_bench")
    args = ap.parse_args()
    if not args.questions.is_file():
        sys.exit(f"questions not found: {args.questions} (--questions)")
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
