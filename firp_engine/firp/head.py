"""The FIRP head: k linear maps from the layer-l residual stream to k pseudo hidden states.

Saved as `<name>.safetensors` (weight [k, d, d], bias [k, d], optionally vocab_order [V]:
token ids by frequency in the training replies, for the draft vocabulary of firp/vocab.py)
plus `<name>.json` (layer, k, dtype, base-model fingerprint, training command, validation
figures).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from firp_engine import ops
from firp_engine.errors import FirpError

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "heads"


class FirpHead(torch.nn.Module):
    """pseudo_i = W_i h + b_i (the paper's maps); with root_embedding (a variant) also
    + U_i e, e the input embedding of the node's own token: the token's identity directly,
    not as 20 layers have mixed it into h."""

    def __init__(
        self, d: int, k: int, layer: int, meta: dict | None = None, root_embedding: bool = False
    ) -> None:
        super().__init__()
        self.layer = layer  # pseudo rows enter after layers [0, layer) have run
        self.k = k
        # Start at the identity: a pseudo state first looks like the current token's state.
        self.weight = torch.nn.Parameter(torch.eye(d).repeat(k, 1, 1))
        self.bias = torch.nn.Parameter(torch.zeros(k, d))
        # Zero: the variant starts as the plain head.
        self.emb_weight = torch.nn.Parameter(torch.zeros(k, d, d)) if root_embedding else None
        self.meta = dict(meta or {})
        self.vocab_order: torch.Tensor | None = None  # int64 [V], most frequent first (vocab.py)

    def forward(self, h: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        """h [n, d] (and e [n, d], the nodes' token embeddings, for the root-embedding
        variant) -> pseudo rows [n * k, d] (row j*k + i is offset i+1 of node j)."""
        w, b = self.weight, self.bias
        if h.dtype != w.dtype:
            w, b = w.to(h.dtype), b.to(h.dtype)
        y = ops.firp_project(h, w, b)  # the reference: differentiable, for training and tests
        if self.emb_weight is not None:
            if e is None:
                raise ValueError("a root-embedding FIRP head needs the nodes' token embeddings")
            y = y + ops.firp_project(e.to(h.dtype), self.emb_weight.to(h.dtype), None)
        return y

    def n_params(self) -> int:
        extra = 0 if self.emb_weight is None else self.emb_weight.numel()
        return self.weight.numel() + self.bias.numel() + extra

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path).with_suffix("")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.meta.update(meta or {})
        self.meta.update({"layer": self.layer, "k": self.k, "d": self.weight.shape[-1], "kind": "firp"})
        tensors = {"weight": self.weight.detach().float().contiguous(), "bias": self.bias.detach().float()}
        if self.emb_weight is not None:
            tensors["emb_weight"] = self.emb_weight.detach().float().contiguous()
        if self.vocab_order is not None:
            tensors["vocab_order"] = self.vocab_order.to(torch.int32).contiguous()
        save_file(tensors, str(path) + ".safetensors")
        Path(str(path) + ".json").write_text(json.dumps(self.meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> FirpHead:
        meta, tensors = read_head_files(path, fingerprint, "firp")
        head = cls(int(meta["d"]), int(meta["k"]), int(meta["layer"]), meta, "emb_weight" in tensors)
        with torch.no_grad():
            head.weight.copy_(tensors["weight"])
            head.bias.copy_(tensors["bias"])
            if head.emb_weight is not None:
                head.emb_weight.copy_(tensors["emb_weight"])
        if "vocab_order" in tensors:
            head.vocab_order = tensors["vocab_order"].to(torch.int64)
        return head


def read_head_files(path: str | Path, fingerprint: str | None, kind: str) -> tuple[dict, dict]:
    """Read `<path>.json` + `<path>.safetensors`, refusing a head made for another model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".json", ".safetensors") else base
    cfg, st = Path(str(base) + ".json"), Path(str(base) + ".safetensors")
    if not cfg.is_file() or not st.is_file():
        raise FirpError(f"head not found: expected {cfg.name} and {st.name} in {cfg.parent}")
    try:
        meta = json.loads(cfg.read_text())
        tensors = load_file(str(st))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise FirpError(f"head {base}: corrupt file ({e})") from None
    if meta.get("kind", "firp") != kind:
        raise FirpError(f"head {base} is a {meta.get('kind')!r} head, not {kind!r}")
    if fingerprint and meta.get("fingerprint") != fingerprint:
        raise FirpError(
            f"head {base} was trained for another model (fingerprint {meta.get('fingerprint')}, "
            f"this model is {fingerprint}); train one with `firp train-head`"
        )
    return meta, tensors


def shipped_head(fingerprint: str, kind: str = "firp") -> Path | None:
    """The head shipped in the package for this model, if any."""
    for cfg in sorted(SHIPPED_DIR.glob("*.json")):
        meta = json.loads(cfg.read_text())
        if meta.get("fingerprint") == fingerprint and meta.get("kind", "firp") == kind:
            return cfg.with_suffix("")
    return None


def resolve_head(llm, head, cls: type, kind: str):
    """The head to use: the object or path given, the LLM's --head, or the one shipped for
    this model; a head trained for another model is refused. cls: FirpHead or MedusaHead."""
    fp = llm.fingerprint
    name = "FIRP" if kind == "firp" else kind.capitalize()
    train = "`firp train-head`" if kind == "firp" else f"`firp train-head --method {kind}`"
    if isinstance(head, cls):
        if head.meta.get("fingerprint") != fp:
            raise FirpError(
                f"{name} head was trained for another model (fingerprint {head.meta.get('fingerprint')}, "
                f"this model is {fp}); train one with {train}"
            )
        return head
    path = head or llm.head_path or shipped_head(fp, kind)
    if path is None:
        raise FirpError(f"no {name} head for this model (fingerprint {fp}): train one with {train}")
    return cls.load(path, fp)
