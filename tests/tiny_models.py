"""Small LLaMA models that the tests write themselves (random weights, own tokenizers)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = (
    "The quick brown fox jumps over the lazy dog. " * 3
    + "Speculative decoding drafts several tokens and verifies them in one forward pass. "
    + "A paged KV cache stores keys and values in fixed-size blocks shared by all sequences. "
    + "Numbers like 12345 and 3.14159 appear in text, as do symbols: #, $, %, & and (brackets). "
    + "def add(a, b):\n    return a + b\n\nclass Tree:\n    pass\n"
) * 20


def write_bpe_tokenizer(folder: Path, vocab_size: int = 300) -> int:
    """A byte-level BPE tokenizer.json trained on CORPUS; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    return tok.get_vocab_size()


def write_sp_tokenizer(folder: Path, vocab_size: int = 300) -> int:
    """A SentencePiece tokenizer.model trained inside the test on CORPUS."""
    import sentencepiece as spm

    text = folder / "corpus.txt"
    text.write_text(CORPUS)
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    text.unlink()
    (folder / "tokenizer.vocab").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "LlamaTokenizer"})
    )
    return vocab_size


def write_tiny_llama(folder: Path, tokenizer: str = "bpe", tie: bool = False, seed: int = 0, **cfg_kw) -> Path:
    """Save a random LlamaForCausalLM with transformers, plus a tokenizer of the given kind."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_bpe_tokenizer(folder) if tokenizer == "bpe" else write_sp_tokenizer(folder)
    cfg = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        bos_token_id=1 if tokenizer == "sp" else 0,
        eos_token_id=2 if tokenizer == "sp" else 1,
    )
    cfg.update(cfg_kw)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    with torch.no_grad():  # random init is tiny; widen it so logits are not all ties
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
