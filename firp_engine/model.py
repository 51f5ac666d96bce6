"""The LLaMA forward over a batch descriptor.

One `Batch` serves every caller: prefill chunks and decode steps of several sequences,
FIRP trees (scratch K/V, per-row bit masks) and FIRP's pseudo rows entering at layer l.
A layer is `run_layer(i, h, positions, attend)`: the attention strategy is a callable,
so training can plug in a dense masked attention over the same weights. Every op runs
through the model's `Backend`, and every tensor the model makes lives on its device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from firp_engine import ops
from firp_engine.backend import Backend
from firp_engine.config import ModelConfig, rope_tables
from firp_engine.errors import FirpError
from firp_engine.kv_cache import KVCache, Sequence
from firp_engine.loading import Checkpoint
from firp_engine.quant import QuantWeight, dequantize, stack_rows

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Linear:
    """A weight [N, K] plus the backend's packed copy of it (made once).

    When the backend's GEMM kernel reads a re-laid-out copy, the kernel needs the original
    only for its shape, so it is dropped (unless `keep`: a weight shared with something else,
    like a tied embedding) and the weights are held once. Then `weight` and autograd (which
    runs the reference) are refused in one line: models that train are built on the torch
    backend, whose packed copy is the weight itself.
    """

    def __init__(self, weight: torch.Tensor | QuantWeight, backend: Backend, keep: bool = False) -> None:
        quant = isinstance(weight, QuantWeight)  # GGUF blocks (firp_engine/quant.py)
        weight = weight if quant else weight.contiguous()
        self.backend = backend
        self.packed = backend.op("pack_linear")(weight)  # not call(): packing is never autograd
        dropped = self.packed is not weight and "linear" not in backend.fallbacks and not keep
        self._weight = None if dropped else weight
        dtype = torch.uint8 if quant else weight.dtype
        self._shape = torch.empty(weight.shape, dtype=dtype, device="meta")  # for the kernel
        # What `linear` is given as its weight: the weight where the reference may read it, else
        # the shape (a kernel reads the packed copy; the quantized kernel takes no QuantWeight).
        reference_reads = self._weight is not None and (not quant or self.packed is weight)
        self._arg = weight if reference_reads else self._shape

    @property
    def weight(self) -> torch.Tensor:
        if self._weight is None:
            raise FirpError(
                f"the {self.backend.name} backend keeps only its packed copy of this weight; "
                "build the model on the torch backend to train or to read weights"
            )
        return self._weight

    def kernel_args(self) -> tuple[torch.Tensor | QuantWeight, torch.Tensor | QuantWeight]:
        """(weight, packed) as the linear kernel takes them: the weight may be its meta stand-in."""
        return self._arg, self.packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight is None and torch.is_grad_enabled():
            self.weight  # noqa: B018  (raises: autograd would need the original weight)
        return self.backend.call("linear", x, *self.kernel_args())


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wqkv: Linear  # q, k, v stacked: one GEMM per layer instead of three
    wo: Linear
    ffn_norm: torch.Tensor
    w_gate_up: Linear  # gate and up stacked
    w_down: Linear


@dataclass
class SeqRows:
    """The rows [start, end) of a batch that belong to one sequence."""

    seq: Sequence
    start: int
    end: int
    mask_bits: torch.Tensor | None = None  # int64 [end-start, W] over these new rows; None = causal
    scratch_start: int = 0  # tree batches: where these rows' K/V go in Batch.scratch


@dataclass
class Batch:
    """What one forward computes. kind: 'decode' (one row per sequence, K/V written to the
    cache first), 'prefill' (K/V written), 'tree' (K/V kept in `scratch` for a later commit)."""

    positions: torch.Tensor  # int64 [T]
    seqs: list[SeqRows]
    kind: str
    slots: torch.Tensor | None = None  # int64 [T], where K/V go for decode/prefill
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # k, v [L, S, Hkv, D] for tree
    _decode_meta: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def n_rows(self) -> int:
        return self.positions.shape[0]

    def decode_meta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded page tables [B, P] int32 and context lengths [B] int32 (computed once per step)."""
        if self._decode_meta is None:
            n_pages = max(len(s.seq.pages) for s in self.seqs)
            rows = [s.seq.pages + [0] * (n_pages - len(s.seq.pages)) for s in self.seqs]
            dev = self.seqs[0].seq.cache.device
            tables = torch.tensor(rows, dtype=torch.int32, device=dev)
            lens = torch.tensor([s.seq.length + 1 for s in self.seqs], dtype=torch.int32, device=dev)
            self._decode_meta = (tables, lens)
        return self._decode_meta


def causal_bits(n: int, device: torch.device) -> torch.Tensor:
    return ops.pack_mask(torch.ones(n, n, dtype=torch.bool, device=device).tril())


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Transformer:
    """The weights, cast to the run dtype on the backend's device (no reference to the
    checkpoint is kept), and the forward. backend None: the torch reference on the CPU."""

    def __init__(self, ckpt: Checkpoint, dtype: str = "fp32", backend: Backend | None = None) -> None:
        self.cfg: ModelConfig = ckpt.config
        self.dtype = DTYPES[dtype]
        # Which kernels run this model's shapes is settled here, once (Backend.for_model).
        self.backend = (backend or Backend.create("torch")).for_model(self.cfg, self.dtype)
        self.device = self.backend.device
        if self.device.type != "cpu" and any(isinstance(v, QuantWeight) for v in ckpt.weights.values()):
            raise FirpError("native (quantized) weights run on the CPU only: use --weights dense")
        w = {
            k: v if isinstance(v, QuantWeight) else v.to(self.device, self.dtype)
            for k, v in ckpt.weights.items()
        }
        cfg = self.cfg
        self.embed = w["model.embed_tokens.weight"]
        self.norm = w["model.norm.weight"]
        tied = cfg.tie_embeddings  # then the LM head's weight is the embedding table, kept anyway
        self.lm_head = Linear(self.embed if tied else w["lm_head.weight"], self.backend, keep=tied)
        self.layers = [self._layer(w, f"model.layers.{i}.") for i in range(cfg.n_layers)]
        self.cos, self.sin = (t.to(self.device) for t in rope_tables(cfg, cfg.max_position))
        self.scale = cfg.head_dim**-0.5
        self.q_size = cfg.n_heads * cfg.head_dim
        self.kv_size = cfg.n_kv_heads * cfg.head_dim
        self.cache: KVCache | None = None
        # The backend's C++ layer loop, when it has one (cpu): same kernels, no Python between them.
        self.stack = self.backend.layer_stack(self)

    def _layer(self, w: dict[str, torch.Tensor], p: str) -> LayerWeights:
        qkv = stack_rows([w[p + f"self_attn.{x}_proj.weight"] for x in "qkv"], self.dtype)
        gate_up = stack_rows([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]], self.dtype)
        return LayerWeights(
            attn_norm=w[p + "input_layernorm.weight"],
            wqkv=Linear(qkv, self.backend),
            wo=Linear(w[p + "self_attn.o_proj.weight"], self.backend),
            ffn_norm=w[p + "post_attention_layernorm.weight"],
            w_gate_up=Linear(gate_up, self.backend),
            w_down=Linear(w[p + "mlp.down_proj.weight"], self.backend),
        )

    def new_cache(self, num_blocks: int, block_size: int = 16) -> KVCache:
        cfg = self.cfg
        self.cache = KVCache(
            cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_blocks, block_size, self.dtype, self.backend
        )
        return self.cache

    def weight_bytes(self) -> int:
        """Bytes of the weights held: run dtype, the backend's packed copies included (on the
        cpu backend the GEMM kernels read a re-laid-out copy), tensors shared counted once."""
        tensors = [self.embed, self.norm, self.lm_head._weight, self.lm_head.packed]
        for lw in self.layers:
            tensors += [lw.attn_norm, lw.ffn_norm]
            for lin in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down):
                tensors += [lin._weight, lin.packed]
        # a dropped original holds nothing; a quantized one, its blocks
        tensors = [t.blocks if isinstance(t, QuantWeight) else t for t in tensors if t is not None]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    def step_bytes(self) -> int:
        """Bytes one decode step streams: every linear's packed weights, the LM head's included
        (the embedding table is read one row per token). Over the copy bandwidth: the floor."""
        lins = [lin for lw in self.layers for lin in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)]
        return sum(lin.packed.nbytes for lin in [*lins, self.lm_head])

    # ------------------------------------------------------------ one layer

    def run_layer(self, i: int, h: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """h [T, d] -> [T, d]. Out of place when autograd is on (training), fused in place otherwise."""
        cfg, lw, call = self.cfg, self.layers[i], self.backend.call
        x = call("rms_norm", h, lw.attn_norm, cfg.rms_eps)
        q, k, v = lw.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t = h.shape[0]
        q, k = call(
            "rope",
            q.reshape(t, cfg.n_heads, cfg.head_dim),
            k.reshape(t, cfg.n_kv_heads, cfg.head_dim),
            positions,
            self.cos,
            self.sin,
        )
        o = attend(i, q, k, v.reshape(t, cfg.n_kv_heads, cfg.head_dim))
        a = lw.wo(o.reshape(t, self.q_size))
        if torch.is_grad_enabled():
            h = h + a
            x = call("rms_norm", h, lw.ffn_norm, cfg.rms_eps)
        else:
            x, h = call("add_rms_norm", a, h, lw.ffn_norm, cfg.rms_eps)
        m = lw.w_down(call("silu_mul", lw.w_gate_up(x)))
        return h + m if torch.is_grad_enabled() else h.add_(m)

    # ------------------------------------------------------------ the batch forward

    def paged_attend(self, batch: Batch) -> Attend:
        """Attention over the paged cache for `batch` (decode, prefill or tree)."""
        cache, call = self.cache, self.backend.call
        assert cache is not None, "call new_cache() first"

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = cache.k[i], cache.v[i]
            if batch.scratch is not None:
                for s in batch.seqs:
                    rows = slice(s.scratch_start, s.scratch_start + s.end - s.start)
                    batch.scratch[0][i, rows] = k[s.start : s.end]
                    batch.scratch[1][i, rows] = v[s.start : s.end]
            if batch.slots is not None:
                call("write_kv", kc, vc, k, v, batch.slots)
            if batch.kind == "decode":
                tables, lens = batch.decode_meta()
                return call("paged_decode_attention", q, kc, vc, tables, lens, self.scale)
            out = torch.empty_like(q)
            for s in batch.seqs:
                n = s.end - s.start
                bits = causal_bits(n, self.device) if s.mask_bits is None else s.mask_bits
                call(
                    "tree_attention",
                    q[s.start : s.end],
                    kc,
                    vc,
                    s.seq.page_table,
                    s.seq.length,
                    k[s.start : s.end],
                    v[s.start : s.end],
                    bits,
                    self.scale,
                    out=out[s.start : s.end],
                )
            return out

        return attend

    def embed_tokens(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Token ids (a list or a tensor) -> their embedding rows [T, d] on the model's device.
        A quantized table (native weights) is dequantized row by row as it is read."""
        ids = torch.as_tensor(ids, device=self.device)
        if isinstance(self.embed, QuantWeight):
            return dequantize(self.embed.rows(ids.reshape(-1))).to(self.dtype).reshape(*ids.shape, -1)
        return self.embed[ids]

    def forward(self, batch: Batch, h: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run layers [start, end) on hidden rows h [T, d] (embed_tokens() for layer 0)."""
        end = self.cfg.n_layers if end is None else end
        if self.stack is not None and not torch.is_grad_enabled():
            return self._forward_stack(batch, h, start, end)
        attend = self.paged_attend(batch)
        for i in range(start, end):
            h = self.run_layer(i, h, batch.positions, attend)
        return h

    def _forward_stack(self, batch: Batch, h: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """forward() through the backend's layer loop: paged_attend's work, metadata made once."""
        cache = self.cache
        assert cache is not None, "call new_cache() first"
        if batch.kind == "decode":  # as paged_attend: K/V to the slots, then paged decode attention
            tables, lens = batch.decode_meta()
            return self.stack.decode(
                h, batch.positions, cache.k, cache.v, batch.slots, tables, lens, start, end
            )
        seqs = batch.seqs
        k_scratch, v_scratch = batch.scratch if batch.scratch is not None else (None, None)
        return self.stack.spans(
            h,
            batch.positions,
            cache.k,
            cache.v,
            batch.slots,
            k_scratch,
            v_scratch,
            [s.start for s in seqs],
            [s.end for s in seqs],
            [s.seq.page_table for s in seqs],
            [s.seq.length for s in seqs],
            [causal_bits(s.end - s.start, self.device) if s.mask_bits is None else s.mask_bits for s in seqs],
            [s.scratch_start for s in seqs],
            start,
            end,
        )

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The model's last RMSNorm: h [T, d] -> [T, d] (what the LM head reads)."""
        return self.backend.call("rms_norm", h, self.norm, self.cfg.rms_eps)

    def head_rows(self, index: torch.Tensor) -> Linear | None:
        """An LM head over the vocabulary rows `index` (int64 [N]) only: the same weight rows,
        so each logit equals the full head's (a draft vocabulary, firp/vocab.py). None when the
        head's weight is not kept (an untied head that the backend holds packed only)."""
        src = self.embed if self.cfg.tie_embeddings else self.lm_head._weight
        if src is None:
            return None
        rows = src.rows(index) if isinstance(src, QuantWeight) else src[index.to(src.device)]
        return Linear(rows, self.backend)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: h [T, d] -> fp32 logits [T, V]."""
        return self.lm_head(self.final_norm(h)).float()
