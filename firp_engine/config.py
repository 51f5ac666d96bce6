"""Model configuration, from a Hugging Face config.json or GGUF metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from firp_engine.errors import FirpError

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "llama")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position: int = 2048
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise FirpError(f"config: {self.n_heads} heads is not a multiple of {self.n_kv_heads} KV heads")
        if self.head_dim % 2:
            raise FirpError(f"config: head_dim {self.head_dim} must be even for RoPE")

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        if not any(a in SUPPORTED_ARCHS for a in archs) and cfg.get("model_type") not in ("llama", "mistral"):
            raise FirpError(f"unsupported architecture {archs[0]!r} (firp-engine runs LLaMA-family models)")
        # transformers v5 writes `rope_parameters` (theta inside); v4 `rope_theta` + `rope_scaling`.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        try:
            n_heads = cfg["num_attention_heads"]
            hidden = cfg["hidden_size"]
            eos = cfg.get("eos_token_id")
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                head_dim=cfg.get("head_dim") or hidden // n_heads,
                rms_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position=cfg.get("max_position_embeddings", 2048),
                tie_embeddings=cfg.get("tie_word_embeddings", False),
                bos_id=cfg.get("bos_token_id"),
                eos_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            )
        except KeyError as e:
            raise FirpError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_gguf(cls, fields: dict, n_vocab_rows: int, has_output: bool) -> ModelConfig:
        arch = fields.get("general.architecture")
        if arch != "llama":
            raise FirpError(f"unsupported GGUF architecture {arch!r} (firp-engine runs 'llama')")

        def get(key: str, default=None):
            v = fields.get(f"llama.{key}", default)
            if v is None:
                raise FirpError(f"GGUF metadata lacks llama.{key}")
            return v

        n_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        scaling = None
        if fields.get("llama.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(fields["llama.rope.scaling.factor"])}
        eos = fields.get("tokenizer.ggml.eos_token_id")
        return cls(
            vocab_size=int(fields.get("llama.vocab_size", n_vocab_rows)),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(fields.get("llama.attention.head_count_kv", n_heads)),
            head_dim=int(fields.get("llama.rope.dimension_count", hidden // n_heads)),
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(fields.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position=int(fields.get("llama.context_length", 2048)),
            tie_embeddings=not has_output,
            bos_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_ids=[] if eos is None else [int(eos)],
        )

    def n_params(self) -> int:
        d, f, kv = self.hidden_size, self.intermediate_size, self.n_kv_heads * self.head_dim
        per_layer = d * (self.n_heads * self.head_dim) * 2 + 2 * d * kv + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head


def rope_tables(cfg: ModelConfig, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin fp32 [max_pos, head_dim/2] for rotate-half RoPE, with the scaled variants."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    pos = torch.arange(max_pos, dtype=torch.float64)
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type") or sc.get("type") or "default"
    if kind == "linear":
        pos = pos / float(sc["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, sc)
    elif kind == "dynamic":
        # Dynamic NTK: fixed at the configured maximum (what the longest context would use).
        factor = float(sc["factor"])
        orig = sc.get("original_max_position_embeddings", cfg.max_position)
        if max_pos > orig:
            base = cfg.rope_theta * ((factor * max_pos / orig) - (factor - 1)) ** (dim / (dim - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    elif kind != "default":
        raise FirpError(f"unsupported rope scaling {kind!r} (supported: linear, llama3, dynamic)")
    angles = torch.outer(pos, inv_freq)
    return angles.cos().float(), angles.sin().float()


def _llama3_inv_freq(inv_freq: torch.Tensor, sc: dict) -> torch.Tensor:
    factor = float(sc["factor"])
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    orig = float(sc.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    smooth = ((orig / wavelen) - low) / (high - low)
    scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= orig / low) & (wavelen >= orig / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
