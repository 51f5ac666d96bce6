"""The `firp` command: generate, chat, info, train-head, bench, serve."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from firp_engine.errors import FirpError

METHOD_CHOICES = ["ar", "firp", "pld", "medusa"]


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument(
        "--weights",
        choices=["auto", "dense", "native", "native-float"],
        default="auto",
        help="dense: dequantized to --dtype; native: a GGUF's Q4_0/Q4_1/Q8_0 blocks, activations "
        "quantized to 8 bits in the GEMM; native-float: blocks, activations kept in --dtype; "
        "auto (default): native for a GGUF in bf16 on the cpu backend, else dense",
    )
    p.add_argument(
        "--backend",
        choices=["torch", "cpu", "triton", "cuda"],
        help="default: $FIRP_BACKEND, else cpu when the C++ extension is built, else torch",
    )
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--kv-blocks", type=int, default=None, help="KV pool size in 16-token blocks")
    p.add_argument("--threads", type=int, default=None)


def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    _method_args(p)


def _method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHOD_CHOICES, default="ar")
    p.add_argument("--head", help="FIRP/Medusa head (default: the shipped one for this model)")
    p.add_argument(
        "--tree-budget",
        type=int,
        default=None,
        help="draft tree nodes, root included (default: chosen from this machine's step cost curve)",
    )
    p.add_argument(
        "--draft-tree",
        choices=["static", "dynamic"],
        default=None,
        help="FIRP: one tree shaped by the head's acceptance table, or one grown each step (default)",
    )
    p.add_argument(
        "--lookup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="FIRP: merge prompt-lookup drafts into the tree (default: on; needs --draft-tree dynamic)",
    )
    p.add_argument(
        "--pseudo-policy",
        default=None,
        help="FIRP: which nodes spawn pseudo rows: all, top, top:M (default: from the step cost curve)",
    )
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        help="FIRP: decode pseudo rows over the N most frequent tokens only (e.g. 16384; default 0: all)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="firp", description="LLaMA inference with FIRP speculative decoding")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt or a JSONL file of prompts")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompts-file", type=Path)
    g.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    g.add_argument("--speedup", action="store_true", help="also run plain decoding and report the ratio")
    _model_args(g)
    _decode_args(g)

    c = sub.add_parser("chat", help="interactive multi-turn chat, streaming")
    _model_args(c)
    _decode_args(c)

    i = sub.add_parser("info", help="model config, dtype, backend, device, fallbacks, memory")
    _model_args(i)
    i.add_argument(
        "--recalibrate",
        action="store_true",
        help="time this machine's step cost curve again (on a quiet machine)",
    )

    t = sub.add_parser("train-head", help="train a FIRP (or Medusa) draft head")
    from firp_engine.firp import train_cli

    train_cli.add_arguments(t)

    b = sub.add_parser("bench", help="Spec-Bench: speedup and acceptance of methods over ar")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of benchmarks/spec_bench.py")

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _model_args(s)
    _method_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=8, help="most requests decoding at once")
    s.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get 429")
    s.add_argument("--max-new-tokens", type=int, default=256, help="max_tokens of a request that sets none")
    s.add_argument("--served-model-name", help="the model id clients name (default: the model file's)")
    return ap


def _llm(args):
    from firp_engine.generate import LLM

    return LLM(
        args.model,
        dtype=args.dtype,
        backend=args.backend,
        max_context=args.max_context,
        kv_blocks=args.kv_blocks,
        head=getattr(args, "head", None),
        threads=args.threads,
        weights=args.weights,
    )


def read_prompts(path: Path) -> tuple[list[str], list]:
    """JSONL records with `prompt` (or Spec-Bench's `turns`, first turn) and an optional id."""
    if not path.is_file():
        raise FirpError(f"prompts file not found: {path}")
    prompts, ids = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            prompt = rec["prompt"] if "prompt" in rec else rec["turns"][0]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise FirpError(f"{path}:{n}: expected a JSON object with 'prompt' or 'turns'") from None
        prompts.append(prompt)
        ids.append(rec.get("id", rec.get("question_id", len(ids))))
    if not prompts:
        raise FirpError(f"{path}: no prompts")
    return prompts, ids


def _method_opts(args) -> dict:
    opts = {
        "tree_budget": args.tree_budget,
        "pseudo_policy": args.pseudo_policy,
        "tree": args.draft_tree,
        "lookup": args.lookup,
        "draft_vocab": args.draft_vocab,
    }
    return {k: v for k, v in opts.items() if v is not None}


def _gen_kwargs(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
    )


def cmd_generate(args) -> None:
    if args.max_new_tokens < 1:
        raise FirpError("--max-new-tokens must be >= 1")
    prompts, ids = read_prompts(args.prompts_file) if args.prompts_file else ([args.prompt], [0])
    llm = _llm(args)
    chat = not args.no_chat
    prompt_ids = [llm.encode(p, chat) for p in prompts]
    if not args.json and len(prompts) == 1 and not args.speedup:
        for piece in llm.stream_ids(prompt_ids[0], args.method, **_gen_kwargs(args), **_method_opts(args)):
            print(piece, end="", flush=True)
        print()
        results = [llm.last_result]
    else:
        results = llm.generate(
            prompts, args.method, ids=ids, prompt_ids=prompt_ids, **_gen_kwargs(args), **_method_opts(args)
        )
    base = None
    if args.speedup:
        base = llm.generate(prompts, "ar", ids=ids, prompt_ids=prompt_ids, **_gen_kwargs(args))
    for j, r in enumerate(results):
        if args.json:
            rec = r.to_json()
            if base:
                rec["ar_tokens_per_s"] = base[j].tokens_per_s
                rec["speedup"] = r.tokens_per_s / base[j].tokens_per_s
            print(json.dumps(rec))
        elif len(results) > 1 or args.speedup:
            print(f"--- [{r.id}]\n{r.text}")
    if not args.json:
        _summary(args.method, results, base)


def _summary(method: str, results, base) -> None:
    toks = sum(r.new_tokens for r in results)
    secs = sum(r.decode_s for r in results)
    steps = sum(r.steps for r in results)
    line = f"[{method}] {toks} tokens in {secs:.2f}s: {toks / max(secs, 1e-9):.1f} tokens/s"
    line += f", mean accepted {(toks - len(results)) / max(steps, 1):.2f} tokens/step"
    if base:
        bt = sum(r.new_tokens for r in base) / max(sum(r.decode_s for r in base), 1e-9)
        line += f"; ar {bt:.1f} tokens/s; speedup {toks / max(secs, 1e-9) / bt:.2f}x"
    print(line, file=sys.stderr)


def cmd_chat(args) -> None:
    llm = _llm(args)
    messages: list[dict] = []
    print("firp chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        ids = llm.check_length(llm.tokenizer.encode_chat(messages))
        pieces = []
        for piece in llm.stream_ids(ids, args.method, **_gen_kwargs(args), **_method_opts(args)):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        r = llm.last_result
        print(f"[{r.tokens_per_s:.1f} tokens/s, {r.mean_accepted:.2f} accepted/step]", file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(pieces)})


def resident_bytes() -> int | None:
    """This process's resident memory (VmRSS of /proc/self/status; None where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cmd_info(args) -> None:
    import torch

    llm = _llm(args)
    cfg, b = llm.config, llm.backend
    rss = resident_bytes()
    info = {
        "source": str(llm.source),
        "fingerprint": llm.fingerprint,
        "parameters": cfg.n_params(),
        "dtype": llm.dtype,
        "weights": llm.weights,
        "backend": b.name,
        "device": str(b.device),
        "cpu_isa": b.isa,  # the SIMD path the cpu backend runs (chosen at load; FIRP_CPU_ISA)
        "cpu_paths": _cpu_paths(),  # what this CPU and OS run, and which of them this build holds
        "threads": torch.get_num_threads(),
        "fallbacks": list(b.fallbacks),  # ops the torch reference runs
        "memory_MiB": {
            "resident": None if rss is None else round(rss / 2**20, 1),
            "weights": round(llm.model.weight_bytes() / 2**20, 1),
            "streamed_per_step": round(llm.model.step_bytes() / 2**20, 1),  # the bandwidth floor's bytes
            "kv_pool": round(llm.cache.bytes() / 2**20, 1),
        },
        "kv_pool": {
            "blocks": llm.cache.num_blocks,
            "block_size": llm.cache.block_size,
            "tokens": llm.cache.num_blocks * llm.cache.block_size,
        },
        "max_context": llm.max_context,
        "draft_tree": _draft_tree_info(llm, args.recalibrate),
        "config": {k: v for k, v in cfg.__dict__.items()},
    }
    print(json.dumps(info, indent=2, default=str))


def _cpu_paths() -> dict | None:
    try:
        from firp_engine.backends import cpu
    except ImportError:
        return None
    return {"cpu_runs": list(cpu.CPU_PATHS), "built": list(cpu.MODULES)}


def _draft_tree_info(llm, recalibrate: bool = False) -> dict:
    """This machine's step cost curve and the FIRP tree it picks (firp/budget.py)."""
    from firp_engine.firp.budget import cost_curve
    from firp_engine.firp.drafter import FirpDrafter
    from firp_engine.firp.head import FirpHead, resolve_head

    try:
        head = resolve_head(llm, None, FirpHead, "firp")
    except FirpError as e:
        return {"note": str(e)}
    curve = cost_curve(llm, recalibrate)
    drafter = FirpDrafter(llm, head)  # plans from the curve just measured (kept for this process)
    budget, policy, speedup = drafter.planned
    return {
        "cost_ms_by_rows": {r: round(ms, 2) for r, ms in curve.items()},
        "firp_tree_budget": budget,
        "firp_pseudo_policy": policy,
        "firp_draft_vocab": "all" if drafter.vocab is None else drafter.vocab.numel(),  # firp/vocab.py
        "expected_speedup": round(speedup, 2),
    }


def cmd_bench(args) -> None:
    import runpy

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "spec_bench.py"
    if not script.is_file():
        raise FirpError(f"{script} not found (firp bench runs from a source checkout)")
    sys.argv = [str(script), *args.bench_args]
    runpy.run_path(str(script), run_name="__main__")


def cmd_serve(args) -> None:
    try:
        from firp_engine.server.app import serve
        from firp_engine.server.engine import Engine
    except ModuleNotFoundError as e:
        raise FirpError(f"firp serve needs {e.name}: pip install 'firp-engine[serve]'") from None
    llm = _llm(args)
    engine = Engine(llm, args.method, _method_opts(args), args.max_batch, args.max_queue, args.max_new_tokens)
    serve(engine, args.host, args.port, args.served_model_name)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"firp: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv  # None: sys.argv (train-head records the command in the head's JSON)
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning  # one line each, like the errors
        return _run(args)


def _run(args) -> int:
    try:
        if args.cmd == "train-head":
            from firp_engine.firp import train_cli

            train_cli.run(args)
        else:
            cmds = {
                "generate": cmd_generate,
                "chat": cmd_chat,
                "info": cmd_info,
                "bench": cmd_bench,
                "serve": cmd_serve,
            }
            cmds[args.cmd](args)
    except FirpError as e:
        print(f"firp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("firp: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
