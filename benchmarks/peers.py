"""Peers on the same GGUF and prompts, one run: llama.cpp (llama-cpp-python) and transformers beside
this engine's `ar` and `firp`, dense and native weights. Batch 1, greedy, decode tokens/s.

    pip install -e '.[peers]'   # llama-cpp-python (an sdist: it compiles llama.cpp, ~20 min on 2 cores)
    python benchmarks/peers.py [--threads 2] [--prompts 20] [--tokens 128] [--rounds 1]
        [--engines llama.cpp transformers firp:ar firp:firp native:ar native:firp] [--out results/peers]

Every engine gets the same prompt ids (this engine's chat template) and decodes greedily to
`<|im_end|>` or --tokens new tokens. The figure is decode tokens/s: the tokens after the first
over the time after the prefill, so prompt processing is excluded everywhere. Engines take turns
prompt by prompt (interleaved), so drift hits all alike. llama.cpp is fed one token at a time
(`n_batch=1`): llama-cpp-python 0.3.36 crashes on multi-token batches of this GGUF, and decode
is one token per call anyway. `agree` is the share of prompts whose output equals this engine's
dense `ar` (llama.cpp computes with 8-bit activations, as `native` does, so it may differ).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from spec_bench import DEFAULT_QUESTIONS, load_questions  # noqa: E402

from firp_engine.backend import cpu_model  # noqa: E402
from firp_engine.generate import LLM  # noqa: E402
from firp_engine.loading import default_model_path  # noqa: E402

EOS = 2  # <|im_end|>, the default model's end of turn
# An engine decodes prompt ids greedily: (new ids, decode seconds after the first token).
Engine = Callable[[list[int], int], tuple[list[int], float]]


def llama_cpp(path: Path, threads: int) -> Engine:
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise SystemExit(f"llama.cpp needs the peers extra: pip install -e '.[peers]' ({e})") from None
    llm = Llama(
        str(path),
        n_ctx=2048,
        n_batch=1,
        n_ubatch=1,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    import numpy as np

    def argmax() -> int:  # the last token's logits (llama-cpp-python keeps none without logits_all)
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())

    def run(ids: list[int], n: int) -> tuple[list[int], float]:
        llm.reset()
        llm.eval(ids)  # the prefill, one token per call (n_batch=1)
        out = [argmax()]
        t0 = time.perf_counter()
        while len(out) < n and out[-1] != EOS:
            llm.eval([out[-1]])
            out.append(argmax())
        return out, time.perf_counter() - t0

    return run


def transformers_engine(path: Path, threads: int) -> Engine:
    from transformers import AutoModelForCausalLM

    # fp32: transformers 5 keeps a GGUF's blocks and computes in fp32 (its advice: fastest so)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()

    @torch.inference_mode()
    def run(ids: list[int], n: int) -> tuple[list[int], float]:
        res = model(torch.tensor([ids]), use_cache=True)
        out, past = [int(res.logits[0, -1].argmax())], res.past_key_values
        t0 = time.perf_counter()
        while len(out) < n and out[-1] != EOS:
            res = model(torch.tensor([[out[-1]]]), past_key_values=past, use_cache=True)
            out.append(int(res.logits[0, -1].argmax()))
            past = res.past_key_values
        return out, time.perf_counter() - t0

    return run


def ours(llms: dict[str, LLM], weights: str, method: str, threads: int) -> Engine:
    if weights not in llms:
        llms[weights] = LLM(None, dtype="bf16", backend="cpu", threads=threads, weights=weights)
    llm = llms[weights]

    def run(ids: list[int], n: int) -> tuple[list[int], float]:
        r = llm.generate("", method, max_new_tokens=n, prompt_ids=[ids])[0]
        return r.new_ids, r.decode_s

    return run


def make_engines(names: list[str], path: Path, threads: int, llms: dict[str, LLM]) -> dict[str, Engine]:
    engines: dict[str, Engine] = {}
    for name in names:
        if name == "llama.cpp":
            engines[name] = llama_cpp(path, threads)
        elif name == "transformers":
            engines[name] = transformers_engine(path, threads)
        else:
            weights, _, method = name.partition(":")
            if weights not in ("dense", "native") or method not in ("ar", "firp", "pld"):
                raise SystemExit(
                    f"unknown engine {name!r} (llama.cpp, transformers, dense|native:ar|firp|pld)"
                )
            engines[name] = ours(llms, weights, method, threads)
    return engines


def markdown(res: dict) -> str:
    base = res["base"]
    lines = [
        f"{res['cpu']}, ISA path {res['isa']}, {res['threads']} threads, {res['model']}, batch 1, greedy, "
        f"{res['prompts']} Spec-Bench prompts x up to {res['tokens']} tokens; activations: ours bf16 "
        "(native: 8-bit inside the GEMM), transformers fp32 on its GGUF blocks, llama.cpp its own",
        "",
        f"| engine | decode tokens/s | x {base} | tokens | agree with dense:ar |",
        "|---|---|---|---|---|",
    ]
    for name, r in res["engines"].items():
        lines.append(
            f"| {name} | {r['tokens_per_s']:.1f} | {r['vs_base']:.2f}x | {r['tokens']} | "
            f"{'-' if r['agree'] is None else r['agree']}/{res['prompts']} |"
        )
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["engines"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 3.6))
    ax.bar(names, [res["engines"][n]["tokens_per_s"] for n in names], color="tab:blue")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"{res['model']}, {res['cpu']}, {res['isa']}, {res['threads']} threads", fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1, help="passes over the prompts")
    ap.add_argument(
        "--engines",
        nargs="+",
        default=["llama.cpp", "transformers", "dense:ar", "dense:firp", "native:ar", "native:firp"],
    )
    ap.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    ap.add_argument("--out", type=Path, default=None, help="writes OUT.json, OUT.md and OUT.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = default_model_path()
    llms = {"dense": LLM(None, dtype="bf16", backend="cpu", threads=args.threads, weights="dense")}
    engines = make_engines(args.engines, path, args.threads, llms)
    probe = llms["dense"]
    qs = load_questions(args.questions, None)
    step = max(1, len(qs) // args.prompts)  # spread over the categories
    prompts = [probe.encode(q["turns"][0])[-1024:] for q in qs[::step][: args.prompts]]
    for run in engines.values():
        run(prompts[0][:32], 8)  # warm-up
    secs = dict.fromkeys(engines, 0.0)
    toks = dict.fromkeys(engines, 0)
    outs: dict[str, list[list[int]]] = {n: [] for n in engines}
    for r in range(args.rounds):
        for ids in prompts:
            for name, run in engines.items():
                new, s = run(ids, args.tokens)
                secs[name] += s
                toks[name] += len(new) - 1
                if r == 0:
                    outs[name].append(new)
    ref = outs.get("dense:ar")
    res = {
        "cpu": cpu_model(),
        "isa": probe.backend.isa,
        "threads": args.threads,
        "model": path.name,
        "prompts": len(prompts),
        "tokens": args.tokens,
        "rounds": args.rounds,
        "base": "llama.cpp" if "llama.cpp" in engines else next(iter(engines)),
        "engines": {},
    }
    for name in engines:
        agree = sum(a == b for a, b in zip(outs[name], ref, strict=True)) if ref else None
        res["engines"][name] = {"tokens_per_s": toks[name] / secs[name], "tokens": toks[name], "agree": agree}
    base = res["engines"][res["base"]]["tokens_per_s"]
    for r in res["engines"].values():
        r["vs_base"] = r["tokens_per_s"] / base
    print(markdown(res))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        args.out.with_suffix(".md").write_text(markdown(res))
        plot(res, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
