"""GGUF loading, and bad input: one clear line naming the problem, exit 2, no traceback."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import write_tiny_gguf, write_tiny_llama

from firp_engine.cli import main
from firp_engine.loading import default_model_path, load

TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q4_0": 0.15, "Q4_1": 0.1}


@pytest.mark.parametrize("qtype", list(TOLERANCE))
def test_gguf_dequantizes_and_unpermutes(tmp_path, qtype):
    ref = write_tiny_gguf(tmp_path / "m.gguf", qtype)
    ck = load(tmp_path / "m.gguf")
    assert ck.config.tie_embeddings and ck.config.n_layers == 2
    for name, w in ref.items():
        rel = ((ck.weights[name] - w).abs().max() / w.abs().max()).item()
        assert rel <= TOLERANCE[qtype], name
    q_err = (
        ck.weights["model.layers.0.self_attn.q_proj.weight"] - ref["model.layers.0.self_attn.q_proj.weight"]
    )
    assert q_err.abs().mean() < 0.5 * ref["model.layers.0.self_attn.q_proj.weight"].abs().mean()


def run_cli(capsys, *argv) -> str:
    capsys.readouterr()  # drop what fixtures printed
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.startswith("firp: error:") and "\n" not in err, err
    return err


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return write_tiny_llama(tmp_path / "m")


def test_missing_model_file(capsys, tmp_path):
    assert "not found" in run_cli(
        capsys, "generate", "--model", str(tmp_path / "nope.gguf"), "--prompt", "hi"
    )


def test_truncated_gguf(capsys, tmp_path):
    src = default_model_path() if default_model_path_exists() else None
    bad = tmp_path / "cut.gguf"
    if src:
        bad.write_bytes(src.read_bytes()[:5_000_000])
    else:
        write_tiny_gguf(tmp_path / "full.gguf")
        data = (tmp_path / "full.gguf").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    err = run_cli(capsys, "generate", "--model", str(bad), "--prompt", "hi")
    assert "GGUF" in err or "truncated" in err


def default_model_path_exists() -> bool:
    try:
        default_model_path()
        return True
    except Exception:
        return False


def test_garbage_gguf(capsys, tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    assert "GGUF" in run_cli(capsys, "info", "--model", str(bad))


def test_corrupt_safetensors(capsys, tiny_folder):
    st = tiny_folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    assert "safetensors" in run_cli(capsys, "info", "--model", str(tiny_folder))


def test_unsupported_architecture(capsys, tiny_folder):
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (tiny_folder / "config.json").write_text(json.dumps(cfg))
    assert "unsupported architecture" in run_cli(capsys, "info", "--model", str(tiny_folder))


def test_unsupported_quant_type(capsys, tmp_path, monkeypatch):
    import gguf

    write_tiny_gguf(tmp_path / "m.gguf", "Q8_0")
    real = gguf.quants.dequantize

    def no_q8(data, qtype):  # stands in for a type gguf cannot dequantize (e.g. Q8_1, F64)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            raise NotImplementedError
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", no_q8)
    out = run_cli(capsys, "info", "--model", str(tmp_path / "m.gguf"), "--weights", "dense")
    assert "unsupported GGUF quant type Q8_0" in out


def test_shape_mismatch(capsys, tiny_folder):
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tiny_folder / "config.json").write_text(json.dumps(cfg))
    assert "shape" in run_cli(capsys, "info", "--model", str(tiny_folder))


def test_missing_weight(capsys, tiny_folder):
    from safetensors.torch import load_file, save_file

    w = load_file(str(tiny_folder / "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, str(tiny_folder / "model.safetensors"))
    assert "missing weight" in run_cli(capsys, "info", "--model", str(tiny_folder))


def test_missing_tokenizer(capsys, tiny_folder):
    (tiny_folder / "tokenizer.json").unlink()
    assert "tokenizer" in run_cli(capsys, "info", "--model", str(tiny_folder))


def test_empty_prompt(capsys, tiny_folder):
    assert "empty prompt" in run_cli(capsys, "generate", "--model", str(tiny_folder), "--prompt", "  ")


def test_prompt_longer_than_context(capsys, tiny_folder):
    err = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_folder),
        "--no-chat",
        "--max-context",
        "16",
        "--prompt",
        "The quick brown fox jumps over the lazy dog. " * 10,
    )
    assert "longer than the context window" in err


def test_kv_pool_too_small(capsys, tiny_folder):
    err = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_folder),
        "--no-chat",
        "--kv-blocks",
        "1",
        "--prompt",
        "The quick brown fox jumps over the lazy dog. " * 4,
    )
    assert "out of KV blocks" in err


def test_kv_exhaustion_mid_generation_keeps_the_pool_usable(tiny_folder):
    from firp_engine.errors import FirpError
    from firp_engine.generate import LLM

    llm = LLM(str(tiny_folder), kv_blocks=2)
    with pytest.raises(FirpError, match="out of KV blocks"):
        llm.generate("The quick brown fox", chat=False, max_new_tokens=100)
    assert llm.cache.free_blocks == 2  # the failed request gave its blocks back
    assert llm.generate("The quick", chat=False, max_new_tokens=4)[0].new_tokens == 4


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top-p"),
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--backend", "cuda"], "backend"),
        (["--head", "/nonexistent/head", "--method", "firp"], "head"),
    ],
)
def test_bad_arguments(capsys, tiny_folder, argv, needle):
    assert needle in run_cli(capsys, "generate", "--model", str(tiny_folder), "--prompt", "hi", *argv)


def test_unknown_cli_option_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "hi", "--bogus"])
    assert e.value.code == 2


def test_bad_prompts_file(capsys, tmp_path, tiny_folder):
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "no prompt key"}\n')
    assert "p.jsonl:1" in run_cli(capsys, "generate", "--model", str(tiny_folder), "--prompts-file", str(f))


def test_prompts_file_json_output(capsys, tmp_path, tiny_folder):
    f = tmp_path / "p.jsonl"
    f.write_text('{"question_id": 7, "turns": ["The quick", "ignored"]}\n{"prompt": "lazy dog", "id": "b"}\n')
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_folder),
            "--prompts-file",
            str(f),
            "--json",
            "--no-chat",
            "--max-new-tokens",
            "5",
            "--dtype",
            "fp32",
        ]
    )
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in lines] == [7, "b"]
    for r in lines:
        assert r["new_tokens"] == len(r["new_ids"]) == 5 and r["steps"] == 4 and r["mean_accepted"] == 1.0
        assert r["tokens_per_s"] > 0 and r["prefill_s"] > 0


def test_gguf_copy_is_refused_when_renamed(capsys, tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf")
    shutil.copy(tmp_path / "m.gguf", tmp_path / "m.bin")
    assert "expected a .gguf" in run_cli(capsys, "info", "--model", str(tmp_path / "m.bin"))
    assert torch.is_tensor(load(tmp_path / "m.gguf").weights["model.norm.weight"])


def test_batch_larger_than_the_pool_waits_for_blocks(tiny_folder):
    """More requests than the pool holds at once: admitted as blocks free up, none lost."""
    from firp_engine.generate import LLM

    llm = LLM(str(tiny_folder), kv_blocks=6)  # 96 tokens: two of these requests at a time
    prompts = [f"The quick brown fox number {i} jumps" for i in range(7)]
    together = llm.generate(prompts, chat=False, max_new_tokens=24)
    assert llm.cache.free_blocks == 6
    alone = [llm.generate(p, chat=False, max_new_tokens=24)[0].new_ids for p in prompts]
    assert [r.new_ids for r in together] == alone
    assert all(r.finish_reason in ("length", "eos") for r in together)
