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
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from firp_engine.errors import FirpError
from firp_engine.tokenizer_backends import (
    NORMAL,
    SentencePieceBackend,
    bpe_from_file,
    byte_level_from_gguf,
    sentencepiece_proto_from_gguf,
)


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
        types = [int(t) for t in fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)]
        if len(types) != len(tokens):
            raise FirpError("the GGUF's tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
        if model == "gpt2":
            backend: _Backend = byte_level_from_gguf(fields, tokens, types)
            default_add_bos = False
        elif model == "llama":
            # llama.cpp (like sentencepiece itself) gives every chunk between special tokens a prefix space.
            proto = sentencepiece_proto_from_gguf(fields, tokens, types)
            backend = SentencePieceBackend(proto, {}, legacy=True)
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
            backend, post_adds_bos = bpe_from_file(folder / "tokenizer.json", special, added)
            default_add_bos = post_adds_bos(special.get("bos_token"))
        elif (folder / "tokenizer.model").is_file():
            proto = (folder / "tokenizer.model").read_bytes()
            # transformers' LlamaTokenizer (legacy=False) adds the prefix space only at the start of the
            # text; without the flag we keep sentencepiece's own behaviour (one per chunk, as Meta's code).
            legacy = bool(config.get("legacy", True))
            backend = SentencePieceBackend(proto, {**added, **_named_extras(special, added)}, legacy)
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
