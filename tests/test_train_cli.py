"""`firp train-head` end to end on a tiny HF folder: both head kinds train, save, and decode."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import write_tiny_llama

from firp_engine import cli
from firp_engine.generate import LLM


def write_shards(folder, vocab: int, n_train: int = 6, n_val: int = 2) -> None:
    g = torch.Generator().manual_seed(0)
    folder.mkdir()
    for split, n in (("train", n_train), ("validation", n_val)):
        ids = [f"{split}{i}" for i in range(n)]
        prompts = [torch.randint(3, vocab, (8,), generator=g, dtype=torch.int32) for _ in ids]
        replies = [torch.randint(3, vocab, (24,), generator=g, dtype=torch.int32) for _ in ids]
        shard = {"split": split, "eos": 1, "ids": ids, "prompt_ids": prompts, "reply_ids": replies}
        torch.save(shard, folder / f"shard_{split}_00000.pt")


@pytest.mark.parametrize("method", ["firp", "medusa"])
def test_train_head_cli_trains_saves_and_decodes(tmp_path, method, capsys):
    model = write_tiny_llama(tmp_path / "model")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    write_shards(tmp_path / "data", vocab)
    out = tmp_path / "head"
    argv = ["train-head", "--model", str(model), "--layer", "1", "--k", "2", "--epochs", "1",
            "--out", str(out), "--data-dir", str(tmp_path / "data"), "--cache-dir", "",
            "--val", "2", "--batch-positions", "8", "--positions-per-seq", "4", "--no-progress",
            "--run-dir", str(tmp_path / "run"), "--method", method]  # fmt: skip
    assert cli.main(argv) == 0
    meta = json.loads((tmp_path / "head.json").read_text())
    assert meta["kind"] == method and meta["k"] == 2 and meta["steps"] == 3
    assert f"--method {method}" in meta["command"] and len(meta["acc"]) == 2
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    llm = LLM(str(model), backend="torch", head=str(out))
    spec = llm.generate("hello world", method, chat=False, max_new_tokens=12)[0]
    plain = llm.generate("hello world", "ar", chat=False, max_new_tokens=12)[0]
    assert spec.new_ids == plain.new_ids


def test_train_head_layer_is_required_for_firp_only(tmp_path, capsys):
    model = write_tiny_llama(tmp_path / "model")  # 3 layers
    argv = ["train-head", "--model", str(model), "--k", "2", "--out", str(tmp_path / "head"),
            "--data-dir", str(tmp_path / "data")]  # fmt: skip
    assert cli.main(argv) == 2
    assert "--layer is required for firp heads" in capsys.readouterr().err
    assert cli.main([*argv, "--method", "medusa"]) == 2  # Medusa's default cached layer: 20
    assert "--layer must be in 1..2, got 20" in capsys.readouterr().err
