"""End to end on the default model: every speculative method's greedy output equals plain
greedy decoding, 20 Spec-Bench prompts x 128 new tokens: in fp32 (up to near-ties), and in
bf16 on the cpu backend token for token (row-invariant kernels). Marked slow (minutes)."""

import json
from pathlib import Path

import pytest
import torch

from firp_engine.errors import FirpError

QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def prompts(n: int = 20) -> list[str]:
    if not QUESTIONS.is_file():
        return [f"Write a short note about topic {i}: trees, rivers, code, and numbers." for i in range(n)]
    qs = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    step = max(1, len(qs) // n)
    return [q["turns"][0] for q in qs[::step][:n]]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["firp", "pld", "medusa"])
def test_speculative_greedy_equals_plain_greedy(default_llm, method):
    ps = prompts()
    try:
        spec = default_llm.generate(ps, method, max_new_tokens=128)
    except FirpError as e:  # no shipped head for this method
        pytest.skip(str(e))
    plain = default_llm.generate(ps, "ar", max_new_tokens=128)
    for s, p in zip(spec, plain):
        div = next(
            (i for i in range(min(len(s.new_ids), len(p.new_ids))) if s.new_ids[i] != p.new_ids[i]), None
        )
        if div is None:
            assert s.new_ids == p.new_ids
            continue
        logits = last_logits(default_llm, p.prompt_ids + p.new_ids[:div])
        top2 = torch.topk(logits, 2).values
        assert (top2[0] - top2[1]).item() < 1e-3, f"{method} diverged at token {div} without a near-tie"
    steps = sum(s.steps for s in spec)
    assert steps < sum(p.steps for p in plain) or method == "medusa"


def last_logits(llm, ids: list[int]) -> torch.Tensor:
    from test_model import engine_logits

    return engine_logits(llm, ids)[-1]


@pytest.fixture(scope="module")
def bf16_llm():
    from firp_engine.backend import available_backends
    from firp_engine.generate import LLM

    if "cpu" not in available_backends():
        pytest.skip("the cpu backend's extension is not built")
    try:
        return LLM(None, dtype="bf16", backend="cpu", weights="dense")
    except FirpError as e:
        pytest.skip(str(e))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["firp", "pld", "medusa"])
def test_bf16_speculative_greedy_is_identical(bf16_llm, method):
    """No near-tie allowance: the cpu kernels give a row the same bits alone or in a tree."""
    ps = prompts()
    plain = bf16_llm.generate(ps, "ar", max_new_tokens=128)
    spec = bf16_llm.generate(ps, method, max_new_tokens=128)
    same = sum(s.new_ids == p.new_ids for s, p in zip(spec, plain, strict=True))
    assert same == len(ps), f"{method}: {same} of {len(ps)} outputs equal ar's in bf16"


@pytest.mark.slow
def test_native_float_weights_decode_like_dequantized_fp32(default_llm):
    """--weights native-float (the GGUF's Q4_1/Q8_0 blocks, exact fp32 activations) gives the
    dequantized fp32 model's greedy output, 20 prompts x 128 tokens (issue 15)."""
    from firp_engine.generate import LLM
    from firp_engine.loading import load

    if default_llm.backend.name != "cpu" or default_llm.dtype != "fp32":
        pytest.skip("the fp32 reference model is not on the cpu backend")
    native = LLM(load(None, weights="native-float"), dtype="fp32", backend="cpu")
    ps = prompts()
    ours = native.generate(ps, "ar", max_new_tokens=128)
    ref = default_llm.generate(ps, "ar", max_new_tokens=128)
    same = sum(a.new_ids == b.new_ids for a, b in zip(ours, ref, strict=True))
    assert same == len(ps), f"{same} of {len(ps)} outputs equal the dequantized fp32 model's"
