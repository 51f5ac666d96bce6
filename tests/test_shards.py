"""Committed self-distillation data: the token-shard format, the import of the first
generator's .pt shards, resumable generation, and the shards the repo ships."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from firp_engine.errors import FirpError
from firp_engine.firp import data, sharegpt
from firp_engine.firp.shards import Record, ShardFolder, index_paths, read_shard

SETTINGS = {"replies": "greedy", "model_file": "m.gguf", "eos": 2, "vocab_size": 1000}


def _records(n: int, start: int = 0, vocab: int = 1000) -> list[Record]:
    g = np.random.default_rng(start)
    return [
        Record(f"r{i}", g.integers(3, vocab, 4 + i % 3).tolist(),
               [*g.integers(3, vocab, 5 + i % 4).tolist(), 2], "sharegpt", ("code", "other")[i % 2])
        for i in range(start, start + n)
    ]  # fmt: skip


def _folder(tmp_path, shard_records: int = 3) -> ShardFolder:
    folder = ShardFolder(tmp_path / "shards", shard_records)
    folder.open(SETTINGS, {"prompts": "test"}, "commit-a")
    return folder


def test_append_round_trips_across_shards(tmp_path):
    folder = _folder(tmp_path)
    recs = _records(7)
    folder.append("train", recs[:2])
    folder.append("train", recs[2:])  # fills shard 0, then 3 + 1 more
    assert [p.name for p in index_paths(folder.path, "train")] == ["train_00000.json", "train_00001.json",
                                                                   "train_00002.json"]  # fmt: skip
    got = data.load_selfdistill("train", folder.path)
    assert got == [(list(r.prompt), list(r.reply)) for r in recs]
    assert folder.done_ids("train") == {r.id for r in recs} and folder.done_ids("validation") == set()
    rows, tokens = read_shard(folder.path / "train_00000.json")
    assert [r[:3] for r in rows] == [["r0", "sharegpt", "code"], ["r1", "sharegpt", "other"],
                                     ["r2", "sharegpt", "code"]]  # fmt: skip
    assert (folder.path / "train_00000.bin").stat().st_size == 2 * len(tokens)
    counts = folder.meta()["counts"]["train"]
    assert counts["records"] == 7 and counts["shards"] == 3 and counts["ends_with_eos"] == 7
    assert counts["reply_tokens"] == sum(len(r.reply) for r in recs)
    assert counts["categories"] == {"code": 4, "other": 3}
    assert not list(folder.path.glob("*.tmp"))


def test_tail_of_a_killed_write_is_ignored_then_dropped(tmp_path):
    folder = _folder(tmp_path, shard_records=10)
    recs = _records(4)
    folder.append("train", recs[:2])
    with (folder.path / "train_00000.bin").open("ab") as f:
        f.write(b"\x05\x00" * 9)  # the .bin of a third record, written just before a kill
    assert len(data.load_selfdistill("train", folder.path)) == 2
    folder.append("train", recs[2:])
    assert data.load_selfdistill("train", folder.path) == [(list(r.prompt), list(r.reply)) for r in recs]


def test_damaged_or_mismatched_shards_are_refused(tmp_path):
    folder = _folder(tmp_path)
    folder.append("train", _records(2))
    bin_path = folder.path / "train_00000.bin"
    raw = bytearray(bin_path.read_bytes())
    raw[0] ^= 1
    bin_path.write_bytes(bytes(raw))
    with pytest.raises(FirpError, match="does not match its index"):
        data.load_selfdistill("train", folder.path)
    bin_path.write_bytes(bytes(raw[:10]))  # truncated, as a Git LFS pointer would be
    with pytest.raises(FirpError, match="does not match its index"):
        folder.done_ids("train")


def test_append_refuses_bad_records_and_other_settings(tmp_path):
    folder = _folder(tmp_path)
    folder.append("train", _records(1))
    with pytest.raises(FirpError, match="already in"):
        folder.append("train", _records(1))
    with pytest.raises(FirpError, match="outside"):
        folder.append("train", [Record("big", [1, 2], [1000])])
    with pytest.raises(FirpError, match="empty"):
        folder.append("train", [Record("empty", [1, 2], [])])
    with pytest.raises(FirpError, match="made otherwise \\(max_new_tokens\\)"):
        ShardFolder(folder.path).open({**SETTINGS, "max_new_tokens": 7}, {}, "commit-b")
    ShardFolder(folder.path).open(SETTINGS, {}, "commit-b")
    assert folder.meta()["generators"] == ["commit-a", "commit-b"]


# ------------------------------------------------------------------ import of .pt shards


def _sharegpt_and_eval(tmp_path) -> tuple[dict[str, list[str]], str, list[str]]:
    """A ShareGPT file of 80 conversations and an evaluation file repeating the last train one;
    returns the conversation ids per split, that one's id, and the CLI's common arguments."""
    convs = [{"id": f"c{i}_0", "conversations": [{"from": "human", "value": f"Please explain topic {i}."}]}
             for i in range(80)]  # fmt: skip
    (tmp_path / "sg.json").write_text(json.dumps(convs))
    ids = {s: [p.conv_id for p in ps] for s, ps in sharegpt.first_user_prompts(convs).items()}
    assert len(ids["train"]) > 10 and ids["validation"]
    banned = ids["train"][-1]
    question = {"question_id": 1, "turns": [f"please explain   TOPIC {banned[1:-2]}."]}
    (tmp_path / "q.jsonl").write_text(json.dumps(question) + "\n")
    return (
        ids,
        banned,
        ["--sharegpt", str(tmp_path / "sg.json"), "--eval-questions", str(tmp_path / "q.jsonl")],
    )


def _pt_shard(path, split: str, ids: list[str]) -> None:
    n = [int(c[1:].split("_")[0]) for c in ids]
    torch.save({"split": split, "eos": 2, "ids": ids,
                "prompt_ids": [torch.tensor([1, 5, i], dtype=torch.int32) for i in n],
                "reply_ids": [torch.tensor([9, i, 2], dtype=torch.int32) for i in n]}, path)  # fmt: skip


def test_import_is_idempotent_incremental_and_drops_evaluation_questions(tmp_path):
    ids, banned, common = _sharegpt_and_eval(tmp_path)
    src, out = tmp_path / "old", tmp_path / "new"
    src.mkdir()
    old_meta = {"model_file": "m.gguf", "model_sha256": "ab", "dtype": "float32", "max_prompt_tokens": 384,
                "max_new_tokens": 256, "chat_template": data.CHAT_TEMPLATE}  # fmt: skip
    (src / "meta.json").write_text(json.dumps(old_meta))
    train = ids["train"]
    _pt_shard(src / "shard_validation_00000.pt", "validation", ids["validation"])
    _pt_shard(src / "shard_train_00000.pt", "train", [*train[:4], banned, ids["validation"][0]])
    _pt_shard(src / "shard_train_sharegpt.pt", "train", train[10:12])  # ShareGPT's replies: not imported
    cmd = [*common, "--out", str(out), "import", str(src), "--generator", "abc"]
    data.main(cmd)
    want_train = train[:4]  # not the evaluation question, nor a validation id, nor ShareGPT's replies
    folder = ShardFolder(out)
    assert [row[0] for row, _, _ in folder.records("train")] == want_train
    assert [row[0] for row, _, _ in folder.records("validation")] == ids["validation"]
    got = data.load_selfdistill("train", out)
    assert got == [([1, 5, int(c[1:-2])], [9, int(c[1:-2]), 2]) for c in want_train]
    assert folder.meta()["settings"] == {
        "replies": "greedy",
        **old_meta,
        "eos": 2,
        "vocab_size": data.VOCAB_SIZE,
    }
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    data.main(cmd)  # again: nothing changes
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _pt_shard(src / "shard_train_00001.pt", "train", train[4:7])  # the old job went on
    data.main(cmd)
    assert [row[0] for row, _, _ in folder.records("train")] == want_train + train[4:7]
    (src / "meta.json").write_text(json.dumps({**old_meta, "dtype": "bfloat16"}))
    with pytest.raises(SystemExit, match="made otherwise \\(dtype\\)"):
        data.main(cmd)


# ------------------------------------------------------------------ resumable generation


def test_generation_resumes_and_skips_done_ids(tmp_path, monkeypatch):
    from tiny_models import write_tiny_llama

    from firp_engine.generate import LLM

    model = write_tiny_llama(tmp_path / "model")
    llm = LLM(str(model), backend="torch", max_context=64, kv_blocks=64)
    eos = min(llm.eos)
    folder = ShardFolder(tmp_path / "shards", shard_records=4)
    folder.open({**SETTINGS, "eos": eos, "vocab_size": llm.config.vocab_size}, {}, "commit")
    texts = ["the quick brown fox", "a paged cache", "def add(a, b):", "numbers like 12345", "class Tree"]
    prompts = {"train": [sharegpt.Prompt(f"t{i}", t) for i, t in enumerate(texts)],
               "validation": [sharegpt.Prompt("v0", "speculative decoding")]}  # fmt: skip
    encode = llm.tokenizer.encode
    generated = []
    real_batch = data.greedy_batch

    def counting_batch(llm_, batch_prompts, max_new, eos_):
        generated.extend(map(tuple, batch_prompts))
        return real_batch(llm_, batch_prompts, max_new, eos_)

    monkeypatch.setattr(data, "greedy_batch", counting_batch)
    work = data.pending(folder, prompts, {"train": 3, "validation": 1}, encode, batch=2)
    data.run_jobs(llm, folder, work, 6, eos)  # the first run stops after 3 train prompts
    assert folder.done_ids("train") == {"t0", "t1", "t2"} and len(generated) == 4
    work = data.pending(folder, prompts, {"train": 5, "validation": 1}, encode, batch=2)
    assert sorted(cid for _, b in work for cid, _, _ in b) == ["t3", "t4"]
    data.run_jobs(llm, folder, work, 6, eos)
    assert len(generated) == 6 and folder.done_ids("train") == {f"t{i}" for i in range(5)}
    recs = {row[0]: (p.tolist(), r.tolist()) for row, p, r in folder.records("train")}
    for i, text in enumerate(texts):  # each record is its prompt's own greedy reply
        assert recs[f"t{i}"] == (encode(text), real_batch(llm, [encode(text)], 6, eos)[0])


# ------------------------------------------------------------------ the shards this repo ships


def test_committed_shards_load_and_are_consistent():
    folder = ShardFolder(data.DATA_DIR)
    assert folder.is_shards(), "data/selfdistill holds no token shards"
    meta = folder.meta()
    eos, max_new = meta["settings"]["eos"], meta["settings"]["max_new_tokens"]
    seen: set[str] = set()
    for split in data.SPLITS:
        rows = [row for row, _, _ in folder.records(split)]
        examples = data.load_selfdistill(split)  # the public loader, default folder
        assert len(examples) == len(rows) == meta["counts"][split]["records"]
        for row, (prompt, reply) in zip(rows, examples):
            assert (len(prompt), len(reply)) == (row[4], row[5])
            assert max(prompt + reply) < meta["settings"]["vocab_size"]
            assert prompt[-1] != eos and eos not in reply[:-1]
            assert reply[-1] == eos or len(reply) == max_new  # ends or was cut, nothing in between
            base = sharegpt._base_id(row[0])
            assert (sharegpt._hash01("split:" + base) < 0.05) == (split == "validation")
        assert not seen & {row[0] for row in rows}
        seen |= {row[0] for row in rows}
    # The prompts all share the chat template's head and tail: the prompt/reply cut is right.
    prompts = [p for s in data.SPLITS for p, _ in data.load_selfdistill(s)]
    assert len({tuple(p[:3]) for p in prompts}) == 1 and len({tuple(p[-4:]) for p in prompts}) == 1
    card = (data.DATA_DIR / "README.md").read_text()
    assert data.counts_table(meta) in card, "the data card's counts are stale: run `... data stats`"


def test_committed_prompts_are_no_evaluation_questions():
    if not all(p.is_file() for p in data.EVAL_QUESTIONS):
        pytest.skip("evaluation questions not found beside the repo")
    try:
        pool = sharegpt.first_user_prompts(sharegpt.load_sharegpt(verbose=False))
    except FirpError as e:
        pytest.skip(str(e))
    text = {p.conv_id: p.text for ps in pool.values() for p in ps}
    banned = sharegpt.eval_keys(data.EVAL_QUESTIONS)
    folder = ShardFolder(data.DATA_DIR)
    ids = [row[0] for s in data.SPLITS for row, _, _ in folder.records(s)]
    assert all(i in text for i in ids)  # every record is a kept prompt
    assert not [i for i in ids if sharegpt.normalize(text[i]) in banned]
