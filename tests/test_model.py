"""The engine against Hugging Face transformers, and batching/chunking invariances."""

import pytest
import torch
from tiny_models import write_tiny_llama

from firp_engine.generate import LLM
from firp_engine.model import Batch, SeqRows

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of Python.",
]


def engine_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """All positions' logits of one prefill through the paged cache."""
    seq = llm.cache.new_sequence()
    seq.reserve(len(ids))
    batch = Batch(torch.arange(len(ids)), [SeqRows(seq, 0, len(ids))], "prefill", seq.slots(0, len(ids)))
    with torch.inference_mode():
        out = llm.model.logits(llm.model.forward(batch, llm.model.embed_tokens(torch.tensor(ids))))
    seq.free()
    return out


def test_default_model_logits_match_transformers(default_llm, hf_default):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, default_llm.config.vocab_size, (64,), generator=g).tolist()
    ours = engine_logits(default_llm, ids)
    with torch.no_grad():
        ref = hf_default(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max().item() <= 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def assert_same_or_near_tie(ours: list[int], ref: list[int], prompt_ids: list[int], hf) -> None:
    """Equal, or the first divergence is at a near-tie of the reference (top-2 gap < 1e-3)."""
    n = min(len(ours), len(ref))
    div = next((i for i in range(n) if ours[i] != ref[i]), None)
    if div is None:
        assert len(ours) == len(ref)
        return
    with torch.no_grad():
        logits = hf(torch.tensor([prompt_ids + ref[:div]])).logits[0, -1].float()
    top2 = torch.topk(logits, 2).values
    assert (top2[0] - top2[1]).item() < 1e-3, f"diverged at {div} without a near-tie"


def test_greedy_generation_matches_transformers(default_llm, hf_default):
    results = default_llm.generate(CHAT_PROMPTS, max_new_tokens=128)
    for r in results:
        with torch.no_grad():
            out = hf_default.generate(
                torch.tensor([r.prompt_ids]),
                max_new_tokens=128,
                do_sample=False,
                eos_token_id=sorted(default_llm.eos),
                pad_token_id=0,
            )
        ref = out[0, len(r.prompt_ids) :].tolist()
        assert_same_or_near_tie(r.new_ids, ref, r.prompt_ids, hf_default)


def test_batch_equals_one_at_a_time(default_llm):
    together = default_llm.generate(CHAT_PROMPTS, max_new_tokens=24)
    for r in together:
        alone = default_llm.generate(CHAT_PROMPTS[r.id], max_new_tokens=24)[0]
        assert alone.new_ids == r.new_ids


def test_chunked_prefill_equals_one_chunk(default_llm):
    ids = default_llm.encode("Tell me about paged attention and why it helps batching.")
    whole = default_llm.generate(CHAT_PROMPTS[:1], prompt_ids=[ids], max_new_tokens=16)[0]
    default_llm.prefill_chunk = 7
    try:
        chunked = default_llm.generate(CHAT_PROMPTS[:1], prompt_ids=[ids], max_new_tokens=16)[0]
    finally:
        default_llm.prefill_chunk = 512
    assert chunked.new_ids == whole.new_ids


def test_streaming_concatenates_to_the_text(default_llm):
    pieces = list(default_llm.stream("Say hello in French and Spanish.", max_new_tokens=32))
    assert "".join(pieces) == default_llm.last_result.text
    assert default_llm.last_result.new_tokens > 0


def test_sampling_is_seeded(default_llm):
    a = default_llm.generate("Name a color.", temperature=0.8, top_p=0.9, top_k=50, seed=3, max_new_tokens=12)
    b = default_llm.generate("Name a color.", temperature=0.8, top_p=0.9, top_k=50, seed=3, max_new_tokens=12)
    assert a[0].new_ids == b[0].new_ids


def test_bf16_stays_close_to_fp32(default_llm):
    llm16 = LLM(None, dtype="bf16", weights="dense")
    ids = default_llm.encode("What is 2 + 2?")
    a = engine_logits(default_llm, ids)
    b = engine_logits(llm16, ids)
    # bf16 rounding: same top token on most positions, no blow-up
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
    assert (a - b).abs().max() < 3.0


@pytest.mark.parametrize("tok,tie", [("bpe", False), ("sp", True)])
def test_hf_folder_matches_transformers(tmp_path, tok, tie):
    from transformers import AutoModelForCausalLM

    folder = write_tiny_llama(tmp_path / "m", tokenizer=tok, tie=tie)
    llm = LLM(str(folder), dtype="fp32")
    ids = llm.tokenizer.encode("The quick brown fox: def add(a, b)")
    ref_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    ours = engine_logits(llm, ids)
    assert (ours - ref).abs().max().item() <= 1e-4
    r = llm.generate("hello", chat=False, max_new_tokens=20)[0]
    with torch.no_grad():
        out = ref_model.generate(
            torch.tensor([r.prompt_ids]), max_new_tokens=20, do_sample=False, eos_token_id=None
        )
    assert r.new_ids == out[0, len(r.prompt_ids) :].tolist()[: len(r.new_ids)]


def test_scaled_rope_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    folder = write_tiny_llama(tmp_path / "m", rope_scaling=scaling)
    llm = LLM(str(folder), dtype="fp32")
    ids = list(range(3, 120))
    ref_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    assert (engine_logits(llm, ids) - ref).abs().max().item() <= 1e-4
