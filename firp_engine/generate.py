"""The generate API: `LLM` loads a model once and runs requests with a decoding method.

A decoder implements `prefill(state)` and `step(states)`: plain `ar` here, batched over
requests, or `spec.step.SpecDecoder` with a drafter (`firp`, `pld`, `medusa`) for
speculative decoding. The driver here owns everything around them: chat templates, KV
sequences, request admission, stop conditions, timing, streaming text.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path

import torch

from firp_engine.backend import Backend
from firp_engine.errors import FirpError
from firp_engine.kv_cache import Sequence
from firp_engine.loading import Checkpoint, auto_weights, load, release_freed_memory
from firp_engine.model import Batch, SeqRows, Transformer
from firp_engine.sampling import SamplingParams, sample
from firp_engine.scheduler import GenerationResult, Request, Scheduler, State

# method name -> "module:Class" (imported on first use): plain decoding, or a drafter that
# the speculative step (spec/step.py) verifies.
METHODS = {
    "ar": "firp_engine.generate:ARDecoder",
    "firp": "firp_engine.firp.dynamic:DynamicFirpDrafter",
    "pld": "firp_engine.baselines.pld:PLDDrafter",
    "medusa": "firp_engine.baselines.medusa:MedusaDrafter",
}


def prefill(model: Transformer, seq: Sequence, ids: list[int], chunk: int) -> torch.Tensor:
    """Write the prompt's K/V in chunks; returns the last row's final hidden state [1, d]."""
    h_last = torch.empty(0)
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        seq.reserve(start + len(part))
        batch = Batch(
            positions=torch.arange(start, start + len(part), device=model.device),
            seqs=[SeqRows(seq, 0, len(part))],
            kind="prefill",
            slots=seq.slots(start, len(part)),
        )
        h = model.forward(batch, model.embed_tokens(part))
        seq.length = start + len(part)
        h_last = h[-1:]
    return h_last


class ARDecoder:
    """Plain autoregressive decoding, batched over requests."""

    batched = True
    overshoot = 1  # most tokens one step commits

    def __init__(self, llm: LLM) -> None:
        self.model = llm.model
        self.chunk = llm.prefill_chunk

    def prefill(self, st: State) -> list[int]:
        h = prefill(self.model, st.seq, st.tokens, self.chunk)
        return sample(self.model.logits(h), st.params, st.gen).tolist()

    def step(self, states: list[State]) -> list[list[int]]:
        for st in states:
            st.seq.reserve(st.seq.length + 1)
        dev = self.model.device
        batch = Batch(
            positions=torch.tensor([st.seq.length for st in states], device=dev),
            seqs=[SeqRows(st.seq, b, b + 1) for b, st in enumerate(states)],
            kind="decode",
            slots=torch.cat([st.seq.slots(st.seq.length, 1) for st in states]),
        )
        ids = torch.tensor([st.tokens[-1] for st in states], device=dev)
        logits = self.model.logits(self.model.forward(batch, self.model.embed_tokens(ids)))
        for st in states:
            st.seq.length += 1
        greedy = logits.argmax(-1).tolist()
        return [
            [greedy[b]] if st.params.greedy else sample(logits[b : b + 1], st.params, st.gen).tolist()
            for b, st in enumerate(states)
        ]


def method_class(name: str):
    if name not in METHODS:
        raise FirpError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def check_options(name: str, cls, opts: dict) -> None:
    """Refuse an option the method does not take, in one line (not a TypeError deep inside)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return  # a subclass passing options on: its base checks them
    takes = set(params) - {"self", "llm"}
    bad = sorted(set(opts) - takes)
    if bad:
        allowed = ", ".join(sorted(takes)) or "none"
        names = ", ".join(map(repr, bad))
        raise FirpError(f"method '{name}' takes no option {names} (its options: {allowed})")


class LLM:
    """Load a model once; generate, stream or chat with any decoding method."""

    def __init__(
        self,
        model: str | Path | Checkpoint | None = None,
        dtype: str = "fp32",
        backend: str | None = None,
        max_context: int | None = None,
        kv_blocks: int | None = None,
        block_size: int = 16,
        prefill_chunk: int = 512,
        head: str | None = None,
        threads: int | None = None,
        weights: str = "auto",
    ) -> None:
        if dtype not in ("fp32", "bf16"):
            raise FirpError(f"unsupported dtype '{dtype}' (fp32 or bf16; fp16 is very slow on CPUs)")
        if threads:
            torch.set_num_threads(threads)
        backend_chosen = Backend.create(backend)  # before loading: an unusable one fails fast
        # weights: loading.WEIGHT_FORMATS or "auto" (a Checkpoint passed in comes as it was loaded)
        if weights == "auto" and not isinstance(model, Checkpoint):
            weights = auto_weights(model, dtype, backend_chosen.name)
        ckpt = model if isinstance(model, Checkpoint) else load(model, weights)
        self.tokenizer = ckpt.tokenizer
        self.config = ckpt.config
        self.source = Path(ckpt.source)
        self.fingerprint = ckpt.fingerprint()
        self.weights = ckpt.weight_format()
        self.model = Transformer(ckpt, dtype, backend_chosen)
        del ckpt  # only the run-dtype weights stay alive (the model holds no reference to it)
        release_freed_memory()
        self.backend = self.model.backend  # less the kernels that refuse this model's shapes
        self.dtype = dtype
        self.max_context = min(self.config.max_position, max_context or 4096)
        blocks = kv_blocks if kv_blocks is not None else 2 * self.max_context // block_size
        self.cache = self.model.new_cache(blocks, block_size)
        self.prefill_chunk = prefill_chunk
        self.head_path = head
        self.eos = set(self.config.eos_ids) | set(self.tokenizer.eos_ids)
        self._decoders: dict = {}

    # ------------------------------------------------------------ prompts

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        if not prompt or not prompt.strip():
            raise FirpError("empty prompt")
        if chat and self.tokenizer.chat_template:
            ids = self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        else:
            ids = self.tokenizer.encode(prompt)
        return self.check_length(ids)

    def check_length(self, ids: list[int]) -> list[int]:
        if len(ids) >= self.max_context:
            raise FirpError(
                f"prompt is {len(ids)} tokens, longer than the context window ({self.max_context})"
            )
        return ids

    def decoder(self, method: str, **opts):
        """ar's decoder, or the speculative step around the method's drafter."""
        cls = method_class(method)
        check_options(method, cls, opts)
        if cls is ARDecoder:
            return ARDecoder(self)
        from firp_engine.spec.step import SpecDecoder

        return SpecDecoder(self, cls(self, **opts))

    # ------------------------------------------------------------ generation

    def generate(
        self,
        prompts: str | list[str],
        method: str = "ar",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        chat: bool = True,
        ids: list | None = None,
        prompt_ids: list[list[int]] | None = None,
        **method_opts,
    ) -> list[GenerationResult]:
        """Generate for each prompt (a batch for batched methods). Returns one result each."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        if prompt_ids is None:
            prompt_ids = [self.encode(p, chat) for p in prompts]
        else:
            prompt_ids = [self.check_length(list(p)) for p in prompt_ids]
        params = SamplingParams(temperature, top_k, top_p, seed)
        reqs = [
            Request(p, ids_, params, max_new_tokens, stop or [], i)
            for i, (p, ids_) in enumerate(zip(prompts, prompt_ids, strict=True))
        ]
        results = self.run(self.decoder(method, **method_opts), reqs)
        for j, res in enumerate(results):
            res.id = ids[j] if ids else j
        return results

    def stream(self, prompt: str, method: str = "ar", chat: bool = True, **kw) -> Iterator[str]:
        """Yield text pieces as they are decoded (never splitting a UTF-8 character)."""
        yield from self.stream_ids(self.encode(prompt, chat), method, **kw)

    def stream_ids(
        self,
        prompt_ids: list[int],
        method: str = "ar",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        **method_opts,
    ) -> Iterator[str]:
        params = SamplingParams(temperature, top_k, top_p, seed)
        sched = Scheduler(self, self.decoder(method, **method_opts))
        rid = sched.add(Request("", self.check_length(prompt_ids), params, max_new_tokens, stop or []))
        text = self.tokenizer.stream_decoder()
        with torch.inference_mode():
            try:
                while not sched.idle:
                    for ev in sched.step():
                        piece = "".join(text.push(t) for t in ev.tokens if t not in self.eos)
                        if piece:
                            yield piece
            finally:
                sched.close()
        tail = text.flush()
        if tail:
            yield tail
        self.last_result = sched.result(rid)

    def run(self, dec, reqs: list[Request]) -> list[GenerationResult]:
        """Run requests through one decoder to the end; one result each, in order."""
        sched = Scheduler(self, dec)
        rids = [sched.add(r) for r in reqs]
        with torch.inference_mode():
            try:
                while not sched.idle:
                    sched.step()
            finally:
                sched.close()
        return [sched.result(r) for r in rids]
