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


def write_sp_tokenizer(folder: Path, vocab_size: int = 400) -> int:
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


def write_tiny_llama(
    folder: Path, tokenizer: str = "bpe", tie: bool = False, seed: int = 0, **cfg_kw
) -> Path:
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


def permute_like_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to Q/K rows (the loader must undo it)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, qtype: str = "F32", seed: int = 0) -> dict[str, torch.Tensor]:
    """A llama GGUF with random weights and a byte-level BPE vocabulary; returns the HF-named
    weights it encodes (before quantization)."""
    import gguf
    import numpy as np
    from tokenizers import Tokenizer

    folder = path.parent / (path.stem + "_tok")
    folder.mkdir(parents=True, exist_ok=True)
    write_bpe_tokenizer(folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    k_quant = qtype.endswith("_K")  # K-quants pack 256 values per block
    n_vocab, d, f, n_layers, nh, nkv = len(vocab), 256 if k_quant else 64, 512 if k_quant else 160, 2, 4, 2
    hd = d // nh
    assert Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size() == n_vocab
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    w = {"model.embed_tokens.weight": rnd(n_vocab, d), "model.norm.weight": 1 + rnd(d) * 0.1}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(f)
    writer.add_head_count(nh)
    writer.add_head_count_kv(nkv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in ("<s>", "</s>", "<unk>") else 1 for t, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    qt = getattr(gguf.GGMLQuantizationType, qtype)

    def put(name: str, t: torch.Tensor, quantize: bool = True) -> None:
        arr = t.numpy().astype(np.float32)
        if quantize and qt != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            writer.add_tensor(name, arr)

    put("token_embd.weight", w["model.embed_tokens.weight"])
    put("output_norm.weight", w["model.norm.weight"], quantize=False)
    names = {
        "attn_q": (nh * hd, d),
        "attn_k": (nkv * hd, d),
        "attn_v": (nkv * hd, d),
        "attn_output": (d, d),
        "ffn_gate": (f, d),
        "ffn_up": (f, d),
        "ffn_down": (d, f),
    }
    hf = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(n_layers):
        for kind, shape in names.items():
            t = rnd(*shape)
            w[f"model.layers.{i}.{hf[kind]}.weight"] = t
            if kind in ("attn_q", "attn_k"):
                t = permute_like_llama_cpp(t, nh if kind == "attn_q" else nkv)
            put(f"blk.{i}.{kind}.weight", t)
        for kind, name in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            t = 1 + rnd(d) * 0.1
            w[f"model.layers.{i}.{name}.weight"] = t
            put(f"blk.{i}.{kind}.weight", t, quantize=False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return w
