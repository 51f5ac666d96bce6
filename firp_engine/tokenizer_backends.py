"""The two tokenizer engines behind `Tokenizer` (tokenizer.py): byte-level BPE on the
`tokenizers` library and SentencePiece on `sentencepiece`, each built from a GGUF's
vocabulary or from a Hugging Face folder's files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from firp_engine.errors import FirpError

# GGUF token types (llama.cpp); SentencePiece numbers its piece types the same way.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Text splits before byte-level BPE, by `tokenizer.ggml.pre`. Each entry is the regex run before the
# GPT-2 ByteLevel step, or None for plain GPT-2. SmolLM (like StarCoder) cuts every digit alone first.
# Llama 3 and Qwen2 replace GPT-2's split with their own (tiktoken cl100k style; Qwen2 with single digits).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_DIGITS = "digits"
_BPE_PRE_SPLITS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    "smollm": _DIGITS,
    "starcoder": _DIGITS,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


# ---- byte-level BPE (tokenizers) -------------------------------------------------------------------


class BPEBackend:
    def __init__(self, tk: Any):
        self.tk = tk
        self.vocab_size = max(tk.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)


def byte_level_from_gguf(fields: dict, tokens: list[str], types: list[int]) -> BPEBackend:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as TkTokenizer

    pre = fields.get("tokenizer.ggml.pre") or "default"
    if pre not in _BPE_PRE_SPLITS:
        known = ", ".join(sorted(_BPE_PRE_SPLITS))
        raise FirpError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {known})")
    merges = fields.get("tokenizer.ggml.merges")
    if not merges:
        raise FirpError("the GGUF's BPE tokenizer has no tokenizer.ggml.merges")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a few files repeat a token; the first id wins
    tk = TkTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))

    split = _BPE_PRE_SPLITS[pre]
    # ByteLevel's own regex is GPT-2's split; a custom split replaces it.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in (None, _DIGITS))
    if split is None:
        tk.pre_tokenizer = byte_level
    elif split == _DIGITS:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tk.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        regex = pre_tokenizers.Split(Regex(split), "isolated")
        tk.pre_tokenizer = pre_tokenizers.Sequence([regex, byte_level])
    tk.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>...) are special: matched whole in the text, dropped by skip_special.
    # User-defined ones (<think>...) are matched whole too but are ordinary text otherwise.
    kinds = dict(zip(tokens, types, strict=True))
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in kinds.items() if k == CONTROL]
    )
    tk.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in kinds.items() if k == USER_DEFINED]
    )
    return BPEBackend(tk)


def bpe_from_file(path: Path, special: dict[str, str], added: dict[str, int]):
    """The backend from tokenizer.json, and a function telling whether its post-processor adds `bos`."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as TkTokenizer

    try:
        tk = TkTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises bare Exceptions
        raise FirpError(f"cannot read {path}: {e}") from None
    # Like transformers: special tokens the config names but tokenizer.json lacks are added.
    missing = [t for t in [*special.values(), *added] if tk.token_to_id(t) is None]
    if missing:
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])

    def post_adds_bos(bos: str | None) -> bool:
        # Without `add_bos_token` in the config, transformers keeps tokenizer.json's post-processor.
        bos_id = tk.token_to_id(bos) if bos else None
        ids = tk.encode("a", add_special_tokens=True).ids
        return bos_id is not None and len(ids) > 1 and ids[0] == bos_id

    return BPEBackend(tk), post_adds_bos


# ---- SentencePiece ----------------------------------------------------------------------------------


class SentencePieceBackend:
    """sentencepiece for the text between special tokens; the special tokens are matched here."""

    def __init__(self, proto: bytes, extra_added: dict[str, int | None], legacy: bool):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        model = pb.ModelProto()
        try:
            model.ParseFromString(proto)
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:  # protobuf's DecodeError or sentencepiece's RuntimeError
            raise FirpError(f"not a valid SentencePiece model: {e}") from None
        self.legacy = legacy
        self.dummy_prefix = model.normalizer_spec.add_dummy_prefix
        model.normalizer_spec.add_dummy_prefix = False
        self.sp_bare = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
        self.trainer_special = _trainer_special_tokens(model)

        pieces = model.pieces
        self.vocab: dict[str, int] = {}
        for i, p in enumerate(pieces):
            self.vocab.setdefault(p.piece, i)
        # Control and unknown pieces are special: matched in the text, dropped by skip_special. User-defined
        # pieces are left to sentencepiece, which emits them whole.
        self.added = {p.piece: i for i, p in enumerate(pieces) if p.type in (UNKNOWN, CONTROL)}
        user_defined = {p.piece for p in pieces if p.type == USER_DEFINED}
        # Config tokens without an id, and not in the vocabulary, are appended to it (as transformers does).
        for token, i in extra_added.items():
            if token not in user_defined:
                next_id = max(len(pieces), max(self.added.values(), default=-1) + 1)
                self.added[token] = self.vocab.setdefault(token, next_id if i is None else i)
        self.special_ids = set(self.added.values())
        self.vocab_size = max(len(pieces), max(self.added.values(), default=-1) + 1)

        self.piece_bytes = [_piece_bytes(p.piece, p.type) for p in pieces]
        self.piece_bytes += [b""] * (self.vocab_size - len(pieces))
        for token, i in self.added.items():
            self.piece_bytes[i] = token.encode()
        alternatives = "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True) if t)
        self.split = re.compile(alternatives) if alternatives else None

    def encode(self, text: str) -> list[int]:
        if self.split is None:
            return self._encode_chunk(text, at_start=True)
        ids: list[int] = []
        start = 0
        for match in self.split.finditer(text):
            ids += self._encode_chunk(text[start : match.start()], at_start=start == 0)
            ids.append(self.added[match.group()])
            start = match.end()
        return ids + self._encode_chunk(text[start:], at_start=start == 0)

    def _encode_chunk(self, chunk: str, at_start: bool) -> list[int]:
        if not chunk:
            return []
        # Legacy: sentencepiece's dummy prefix on every chunk. Otherwise (transformers' Llama) only on the
        # chunk that opens the text, and not when that chunk already starts with a space.
        prefixed = self.legacy or (at_start and not chunk.startswith(" "))
        return (self.sp if prefixed else self.sp_bare).encode(chunk)

    def decode(self, ids: list[int], skip_special: bool) -> str:
        n = self.vocab_size
        data = b"".join(
            self.piece_bytes[i] for i in ids if 0 <= i < n and not (skip_special and i in self.special_ids)
        )
        text = data.decode("utf-8", errors="replace")
        # The dummy prefix space is not part of the text.
        return text[1:] if self.dummy_prefix and text.startswith(" ") else text

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)


def _piece_bytes(piece: str, kind: int) -> bytes:
    if kind == BYTE:  # "<0x0A>"
        return bytes([int(piece[3:-1], 16)])
    return piece.replace("\u2581", " ").encode()


def _trainer_special_tokens(model: Any) -> dict[str, str]:
    """The bos/eos/unk/pad pieces a SentencePiece model declares, as {"bos_token": "<s>", ...}."""
    spec = model.trainer_spec
    ids = {
        "bos_token": spec.bos_id,
        "eos_token": spec.eos_id,
        "unk_token": spec.unk_id,
        "pad_token": spec.pad_id,
    }
    return {name: model.pieces[i].piece for name, i in ids.items() if 0 <= i < len(model.pieces)}


def sentencepiece_proto_from_gguf(fields: dict, tokens: list[str], types: list[int]) -> bytes:
    """A SentencePiece BPE model with the GGUF's pieces, scores and types (as llama.cpp tokenizes them)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = fields.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise FirpError("the GGUF's SentencePiece tokenizer has no tokenizer.ggml.scores")
    model = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types, strict=True):
        model.pieces.add(piece=token, score=float(score), type=kind)
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.byte_fallback = BYTE in types
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    spec.unk_id = int(unk) if unk is not None else (types.index(UNKNOWN) if UNKNOWN in types else 0)
    spec.bos_id = spec.eos_id = spec.pad_id = -1  # ids are handled by the Tokenizer, not sentencepiece
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()
