"""Text <-> token ids: byte-level BPE and SentencePiece, from GGUF metadata or a Hugging Face folder.

The reference is `transformers`: `encode` matches special tokens written in the text, the chat template
renders in the same sandboxed Jinja environment, and `encode_chat` tokenizes the rendered text without
adding BOS (the template writes it), as `apply_chat_template(tokenize=True)` does.

Byte-level BPE runs on the `tokenizers` library (built from `tokenizer.json`, or from a GGUF's vocabulary
and merges); SentencePiece runs on `sentencepiece` (from `tokenizer.model`, or a model rebuilt from a
GGUF's pieces and scores), with special tokens split out of the text here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from firp_engine.errors import FirpError

# GGUF token types (llama.cpp); SentencePiece numbers its piece types the same way.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

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


class _Backend(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special: bool) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


class Tokenizer:
    """One model's tokenizer: encode/decode, special ids and chat template."""

    def __init__(
        self,
        backend: _Backend,
        bos_id: int | None,
        eos_ids: Iterable[int],
        add_bos: bool,
        chat_template: str | None,
        special_tokens: dict[str, str],
    ):
        self._backend = backend
        self.bos_id = bos_id
        self.eos_ids = {int(i) for i in eos_ids}
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template
        self.vocab_size = backend.vocab_size
        self._special_tokens = special_tokens  # bos_token, eos_token, ... as the template sees them
        self._template = None  # compiled lazily

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, fields: dict) -> Tokenizer:
        """From GGUF metadata, {key: value}: the `tokenizer.ggml.*` keys and `tokenizer.chat_template`."""
        model = fields.get("tokenizer.ggml.model")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not tokens:
            raise FirpError("the GGUF has no tokenizer (no tokenizer.ggml.tokens)")
        tokens = [str(t) for t in tokens]
        types = [int(t) for t in fields.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)]
        if len(types) != len(tokens):
            raise FirpError("the GGUF's tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
        if model == "gpt2":
            backend: _Backend = _byte_level_from_gguf(fields, tokens, types)
            default_add_bos = False
        elif model == "llama":
            # llama.cpp (like sentencepiece itself) gives every chunk between special tokens a prefix space.
            proto = _sentencepiece_proto_from_gguf(fields, tokens, types)
            backend = _SentencePieceBackend(proto, {}, legacy=True)
            default_add_bos = True  # llama.cpp's default for SentencePiece vocabularies
        else:
            raise FirpError(f"unsupported GGUF tokenizer model {model!r} (supported: 'gpt2', 'llama')")

        def token_id(key: str) -> int | None:
            value = fields.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        names = {
            "bos_token": "bos_token_id",
            "eos_token": "eos_token_id",
            "unk_token": "unknown_token_id",
            "pad_token": "padding_token_id",
        }
        special = {name: tokens[i] for name, key in names.items() if (i := token_id(key)) is not None}
        eos_keys = ("eos_token_id", "eot_token_id", "eom_token_id")
        eos_ids = {i for key in eos_keys if (i := token_id(key)) is not None}
        add_bos = fields.get("tokenizer.ggml.add_bos_token", default_add_bos)
        chat_template = fields.get("tokenizer.chat_template")
        return cls(backend, token_id("bos_token_id"), eos_ids, bool(add_bos), chat_template, special)

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """From a Hugging Face folder: `tokenizer.json` or `tokenizer.model`, and the config files."""
        folder = Path(path)
        if not folder.is_dir():
            raise FirpError(f"tokenizer folder {folder} does not exist")
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        special = {n: t for n in names if (t := _token_content(config.get(n) or special_map.get(n)))}
        added = _config_added_tokens(config)

        if (folder / "tokenizer.json").is_file():
            backend, post_adds_bos = _tokenizers_backend_from_file(folder / "tokenizer.json", special, added)
            default_add_bos = post_adds_bos(special.get("bos_token"))
        elif (folder / "tokenizer.model").is_file():
            proto = (folder / "tokenizer.model").read_bytes()
            # transformers' LlamaTokenizer (legacy=False) adds the prefix space only at the start of the
            # text; without the flag we keep sentencepiece's own behaviour (one per chunk, as Meta's code).
            legacy = bool(config.get("legacy", True))
            backend = _SentencePieceBackend(proto, {**added, **_named_extras(special, added)}, legacy)
            special = {**backend.trainer_special, **special}  # the model's own <s>, </s>, <unk> by default
            default_add_bos = False  # transformers' default when the config does not say
        else:
            raise FirpError(f"no tokenizer.json or tokenizer.model in {folder}")

        bos_id = backend.token_to_id(special["bos_token"]) if "bos_token" in special else None
        eos_ids = _generation_eos_ids(folder)
        if "eos_token" in special and (eos := backend.token_to_id(special["eos_token"])) is not None:
            eos_ids.add(eos)
        add_bos = config.get("add_bos_token", default_add_bos)
        return cls(backend, bos_id, eos_ids, bool(add_bos), _folder_chat_template(folder, config), special)

    # ---- text <-> ids --------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in it (like <|im_start|>) become their ids."""
        ids = self._backend.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        """Incremental decoding for printing tokens as they come (special tokens left out by default)."""
        return StreamDecoder(self, skip_special)

    # ---- chat --------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` ([{"role": ..., "content": ...}, ...]), rendered as transformers does."""
        if self.chat_template is None:
            raise FirpError("this tokenizer has no chat template")
        if not messages:
            raise FirpError("cannot apply the chat template to an empty conversation")
        if self._template is None:
            self._template = _compile_chat_template(self.chat_template)
        # transformers drops keys whose value is None before rendering.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        import jinja2

        try:
            return self._template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except jinja2.TemplateError as e:
            raise FirpError(f"chat template: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Same ids as transformers' `apply_chat_template(messages, tokenize=True)`: no BOS added."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)


class StreamDecoder:
    """Ids in one at a time, text out, never a partial UTF-8 character.

    Each push decodes a short window (the tokens already printed in the last step plus the new ones) and
    prints what the new ones add. Starting the window one step back keeps context-dependent decoding (a
    prefix space stripped at the start of the text) identical to decoding everything at once. A window
    that ends in U+FFFD is the first bytes of a character whose last bytes are still to come: held back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # window start: the tokens printed in the previous step
        self._read = 0  # tokens before this index have been printed

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back, incomplete characters included (as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        printed = decode(self._ids[self._prefix : self._read], self._skip_special)
        text = decode(self._ids[self._prefix :], self._skip_special)
        if len(text) <= len(printed) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(printed) :]


# ---- byte-level BPE (tokenizers) -------------------------------------------------------------------


class _TokenizersBackend:
    def __init__(self, tk: Any):
        self.tk = tk
        self.vocab_size = max(tk.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)


def _byte_level_from_gguf(fields: dict, tokens: list[str], types: list[int]) -> _TokenizersBackend:
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
        [AddedToken(t, special=True, normalized=False) for t, k in kinds.items() if k == _CONTROL]
    )
    tk.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in kinds.items() if k == _USER_DEFINED]
    )
    return _TokenizersBackend(tk)


def _tokenizers_backend_from_file(path: Path, special: dict[str, str], added: dict[str, int]):
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

    return _TokenizersBackend(tk), post_adds_bos


# ---- SentencePiece ----------------------------------------------------------------------------------


class _SentencePieceBackend:
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
        self.added = {p.piece: i for i, p in enumerate(pieces) if p.type in (_UNKNOWN, _CONTROL)}
        user_defined = {p.piece for p in pieces if p.type == _USER_DEFINED}
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
    if kind == _BYTE:  # "<0x0A>"
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


def _sentencepiece_proto_from_gguf(fields: dict, tokens: list[str], types: list[int]) -> bytes:
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
    spec.byte_fallback = _BYTE in types
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    spec.unk_id = int(unk) if unk is not None else (types.index(_UNKNOWN) if _UNKNOWN in types else 0)
    spec.bos_id = spec.eos_id = spec.pad_id = -1  # ids are handled by the Tokenizer, not sentencepiece
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()


# ---- Hugging Face folder helpers ----------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FirpError(f"cannot read {path}: {e}") from None


def _token_content(value: Any) -> str | None:
    """A special token as the config writes it: a string or a serialized AddedToken {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _config_added_tokens(config: dict) -> dict[str, int]:
    """`added_tokens_decoder` of tokenizer_config.json: {content: id}."""
    entries = config.get("added_tokens_decoder") or {}
    return {c: int(i) for i, entry in entries.items() if (c := _token_content(entry)) is not None}


def _named_extras(special: dict[str, str], added: dict[str, int]) -> dict[str, int | None]:
    """Named special tokens (bos, eos...) not in `added_tokens_decoder`: ids come from the vocabulary."""
    return {t: None for t in special.values() if t not in added}


def _generation_eos_ids(folder: Path) -> set[int]:
    value = _read_json(folder / "generation_config.json").get("eos_token_id")
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, list) else [value])}


def _folder_chat_template(folder: Path, config: dict) -> str | None:
    """chat_template.jinja (newer checkpoints) or tokenizer_config.json's chat_template (maybe named ones)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


# ---- chat templates ------------------------------------------------------------------------------------


def _compile_chat_template(source: str) -> Any:
    """The template in an environment that renders like transformers' (sandboxed, same options)."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; a no-op here.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False
    ):
        # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise FirpError(f"invalid chat template: {e}") from None
