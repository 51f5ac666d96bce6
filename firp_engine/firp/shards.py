"""Token shards: the compact form in which self-distillation data is committed to the repo.

A shard folder holds, per split, numbered pairs `<split>_<nnnnn>.bin` + `<split>_<nnnnn>.json`.
The .bin is every record's prompt ids then reply ids, back to back, as little-endian uint16
(vocabularies up to 65536). The .json is its index: the token count and sha256 of the .bin,
then one line per record, `[id, source, category, offset, prompt_len, reply_len]`.
`meta.json` holds the settings that made the replies (records made otherwise are refused),
their provenance and the counts.

Writes are atomic file by file: the .bin first, then its index, then meta.json. The index
says how many tokens are valid, so a run killed between two writes leaves at most an
unindexed tail in the .bin, which readers ignore and the next append drops.

The folders of the first generator (`shard_<split>_<n>.pt`, torch-saved lists of int32
tensors) are read by `legacy_records`, for import and for training on an old cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from firp_engine.errors import FirpError

FORMAT = "firp-token-shards/1"
TOKEN_DTYPE = np.dtype("<u2")
COLUMNS = ("id", "source", "category", "offset", "prompt_len", "reply_len")
# ~512 records of ~300 tokens: ~300 KB per .bin, so a shard rewritten per batch stays cheap
# and a folder of thousands of replies is a handful of files.
SHARD_RECORDS = 512
Example = tuple[list[int], list[int]]  # (prompt ids, reply ids)


@dataclass(frozen=True)
class Record:
    id: str
    prompt: Sequence[int]
    reply: Sequence[int]
    source: str = "sharegpt"
    category: str = "other"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a killed run never leaves a half-written file behind


def write_json(path: Path, obj: object) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())


def index_paths(folder: Path, split: str) -> list[Path]:
    """The index files of `split`'s shards, in the order they were written."""
    return sorted(folder.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9].json"))


def _sha256(tokens: np.ndarray) -> str:
    return hashlib.sha256(tokens.astype(TOKEN_DTYPE).tobytes()).hexdigest()


def read_shard(index_path: Path) -> tuple[list[list], np.ndarray]:
    """One shard's index rows and its tokens, checked against each other."""
    index = json.loads(index_path.read_text())
    if index.get("format") != FORMAT:
        raise FirpError(f"{index_path}: not a {FORMAT} index")
    n, bin_path = index["n_tokens"], index_path.with_suffix(".bin")
    tokens = np.fromfile(bin_path, dtype=TOKEN_DTYPE, count=n) if bin_path.is_file() else np.zeros(0)
    if len(tokens) != n or _sha256(tokens) != index["sha256"]:
        raise FirpError(
            f"{bin_path} does not match its index ({len(tokens)} of {n} tokens, or another sha256): "
            "a truncated copy, a Git LFS pointer, or a .bin and .json from different commits"
        )
    end = 0
    for row in index["records"]:
        if row[3] != end:
            raise FirpError(f"{index_path}: record {row[0]!r} starts at {row[3]}, expected {end}")
        end += row[4] + row[5]
    if end != n:
        raise FirpError(f"{index_path}: the records cover {end} tokens, the .bin holds {n}")
    return index["records"], tokens


def _index_text(split: str, rows: list[list], tokens: np.ndarray) -> str:
    """The index as JSON with one record per line, so a grown shard diffs by its new lines."""
    head = {"format": FORMAT, "split": split, "dtype": "uint16 little-endian", "n_tokens": len(tokens),
            "sha256": _sha256(tokens), "columns": list(COLUMNS)}  # fmt: skip
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    return "{" + json.dumps(head)[1:-1] + ', "records": [\n' + body + "\n]}\n"


def split_counts(folder: Path, split: str, eos: int) -> dict:
    """Records, tokens, replies that end with `eos` and records per category, from the shards."""
    keys = ("records", "prompt_tokens", "reply_tokens", "ends_with_eos", "shards")
    out: dict = {**dict.fromkeys(keys, 0), "categories": {}}
    for path in index_paths(folder, split):
        rows, tokens = read_shard(path)
        out["shards"] += 1
        for _id, _source, category, offset, p_len, r_len in rows:
            out["records"] += 1
            out["prompt_tokens"] += p_len
            out["reply_tokens"] += r_len
            out["ends_with_eos"] += int(tokens[offset + p_len + r_len - 1] == eos)
            out["categories"][category] = out["categories"].get(category, 0) + 1
    out["categories"] = dict(sorted(out["categories"].items()))
    return out


class ShardFolder:
    """A folder of token shards and its meta.json (see the module docstring)."""

    def __init__(self, path: str | Path, shard_records: int = SHARD_RECORDS) -> None:
        self.path = Path(path)
        self.shard_records = shard_records

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    def meta(self) -> dict:
        return json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else {}

    def is_shards(self) -> bool:
        return self.meta().get("format") == FORMAT

    def open(self, settings: dict, provenance: dict, generator: str) -> None:
        """Start a folder for replies made with `settings`, or check that it holds such replies,
        and note `generator` (the code's commit) among those that wrote to it."""
        meta = self.meta()
        if meta:
            old = meta.get("settings", {})
            diff = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
            if meta.get("format") != FORMAT or diff:
                what = ", ".join(diff) or "format"
                raise FirpError(f"{self.path} holds records made otherwise ({what}): use another folder")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            meta = {"format": FORMAT, "settings": settings, **provenance, "generators": [], "counts": {}}
        if generator not in meta["generators"]:
            meta["generators"].append(generator)
        write_json(self.meta_path, meta)

    def records(self, split: str) -> Iterator[tuple[list, np.ndarray, np.ndarray]]:
        """(index row, prompt ids, reply ids) of every record of `split`, in written order."""
        for path in index_paths(self.path, split):
            rows, tokens = read_shard(path)
            for row in rows:
                o, p, r = row[3], row[4], row[5]
                yield row, tokens[o : o + p], tokens[o + p : o + p + r]

    def done_ids(self, split: str) -> set[str]:
        return {row[0] for path in index_paths(self.path, split) for row in read_shard(path)[0]}

    def append(self, split: str, records: Sequence[Record]) -> None:
        """Add records to `split`: to its last shard while it has room, then to new ones."""
        vocab = self.meta()["settings"]["vocab_size"]
        seen = self.done_ids(split)
        for rec in records:
            ids = [*rec.prompt, *rec.reply]
            if not rec.prompt or not rec.reply or min(ids) < 0 or max(ids) >= min(vocab, 1 << 16):
                raise FirpError(f"record {rec.id!r}: empty, or ids outside [0, {vocab})")
            if rec.id in seen:
                raise FirpError(f"record {rec.id!r} is already in {self.path} ({split})")
            seen.add(rec.id)
        pending = list(records)
        while pending:
            paths = index_paths(self.path, split)
            path = paths[-1] if paths else None
            rows, tokens = read_shard(path) if path else ([], np.zeros(0, TOKEN_DTYPE))
            if path is None or len(rows) >= self.shard_records:  # start a new shard
                path, rows, tokens = (
                    self.path / f"{split}_{len(paths):05d}.json",
                    [],
                    np.zeros(0, TOKEN_DTYPE),
                )
            room = self.shard_records - len(rows)
            take, pending = pending[:room], pending[room:]
            parts, offset = [tokens], len(tokens)
            for rec in take:
                rows.append([rec.id, rec.source, rec.category, offset, len(rec.prompt), len(rec.reply)])
                parts += [np.asarray(rec.prompt, TOKEN_DTYPE), np.asarray(rec.reply, TOKEN_DTYPE)]
                offset += len(rec.prompt) + len(rec.reply)
            tokens = np.concatenate(parts)
            write_atomic(path.with_suffix(".bin"), tokens.tobytes())
            write_atomic(path, _index_text(split, rows, tokens).encode())
        meta = self.meta()
        meta["counts"][split] = split_counts(self.path, split, meta["settings"]["eos"])
        write_json(self.meta_path, meta)


# ------------------------------------------------------------------ the first generator's folders

_LEGACY_SHARD = re.compile(r"shard_(?P<split>[a-z]+)_(?P<n>\d+|sharegpt)\.pt")


def legacy_shards(folder: Path, split: str, numbered_only: bool = False) -> list[Path]:
    """`shard_<split>_<n>.pt` (greedy replies, in written order), and unless `numbered_only`
    `shard_<split>_sharegpt.pt` (ShareGPT's own replies)."""
    out = []
    for path in sorted(folder.glob(f"shard_{split}_*.pt")):
        m = _LEGACY_SHARD.fullmatch(path.name)
        if m and m["split"] == split and (m["n"].isdigit() or not numbered_only):
            out.append(path)
    return out


def legacy_records(
    folder: Path, split: str, numbered_only: bool = False
) -> Iterator[tuple[Path, int, str, list[int], list[int]]]:
    """(shard, its eos id, record id, prompt ids, reply ids) from a first-generator folder."""
    import torch

    for path in legacy_shards(folder, split, numbered_only):
        shard = torch.load(path, weights_only=True)
        for cid, p, r in zip(shard["ids"], shard["prompt_ids"], shard["reply_ids"], strict=True):
            yield path, int(shard["eos"]), str(cid), p.tolist(), r.tolist()
