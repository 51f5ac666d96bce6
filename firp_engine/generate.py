"""The generate API: `LLM` loads a model once and runs requests with a decoding method.

A decoder implements `prefill(state)` and `step(states)`: plain `ar` here, batched over
requests, or `spec.step.SpecDecoder` with a drafter (`firp`, `pld`, `medusa`) for
speculative decoding. The driver here owns everything around them: chat templates, KV
sequences, request admission, stop conditions, timing, streaming text.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from firp_engine import ops
from firp_engine.errors import FirpError
from firp_engine.kv_cache import Sequence
from firp_engine.loading import load
from firp_engine.model import Batch, SeqRows, Transformer
from firp_engine.sampling import SamplingParams, sample

# method name -> "module:Class" (imported on first use): plain decoding, or a drafter that
# the speculative step (spec/step.py) verifies.
METHODS = {
    "ar": "firp_engine.generate:ARDecoder",
    "firp": "firp_engine.firp.drafter:FirpDrafter",
    "pld": "firp_engine.baselines.pld:PLDDrafter",
    "medusa": "firp_engine.baselines.medusa:MedusaDrafter",
}


@dataclass
class State:
    """One request in flight."""

    seq: Sequence
    tokens: list[int]  # prompt + accepted tokens; the last one is not in the cache yet
    n_prompt: int
    gen: torch.Generator | None = None
    extra: dict = field(default_factory=dict)  # the decoder's own per-request state
    hist: dict[int, int] = field(default_factory=dict)  # tokens per step -> steps


@dataclass
class GenerationResult:
    id: object
    prompt: str
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    new_tokens: int
    steps: int
    mean_accepted: float
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    finish_reason: str
    accepted_hist: dict[int, int] = field(default_factory=dict)  # tokens per step -> steps

    def to_json(self) -> dict:
        return asdict(self)


def prefill(model: Transformer, seq: Sequence, ids: list[int], chunk: int) -> torch.Tensor:
    """Write the prompt's K/V in chunks; returns the last row's final hidden state [1, d]."""
    h_last = torch.empty(0)
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        seq.reserve(start + len(part))
        batch = Batch(
            positions=torch.arange(start, start + len(part)),
            seqs=[SeqRows(seq, 0, len(part))],
            kind="prefill",
            slots=seq.slots(start, len(part)),
        )
        h = model.forward(batch, model.embed_tokens(torch.tensor(part)))
        seq.length = start + len(part)
        h_last = h[-1:]
    return h_last


class ARDecoder:
    """Plain autoregressive decoding, batched over requests."""

    batched = True
    overshoot = 1  # most tokens one step commits

    def __init__(self, llm: LLM, params: SamplingParams) -> None:
        self.model = llm.model
        self.params = params
        self.chunk = llm.prefill_chunk

    def prefill(self, st: State) -> list[int]:
        h = prefill(self.model, st.seq, st.tokens, self.chunk)
        return sample(self.model.logits(h), self.params, st.gen).tolist()

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
        if self.params.greedy:
            return [[t] for t in logits.argmax(-1).tolist()]
        return [sample(logits[b : b + 1], self.params, st.gen).tolist() for b, st in enumerate(states)]


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
    takes = set(params) - {"self", "llm", "params"}
    bad = sorted(set(opts) - takes)
    if bad:
        allowed = ", ".join(sorted(takes)) or "none"
        names = ", ".join(map(repr, bad))
        raise FirpError(f"method '{name}' takes no option {names} (its options: {allowed})")


class LLM:
    """Load a model once; generate, stream or chat with any decoding method."""

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "fp32",
        backend: str | None = None,
        max_context: int | None = None,
        kv_blocks: int | None = None,
        block_size: int = 16,
        prefill_chunk: int = 512,
        head: str | None = None,
        threads: int | None = None,
    ) -> None:
        if dtype not in ("fp32", "bf16"):
            raise FirpError(f"unsupported dtype '{dtype}' (fp32 or bf16; fp16 is very slow on CPUs)")
        if threads:
            torch.set_num_threads(threads)
        self.backend = ops.set_backend(backend)
        self.ckpt = load(model)
        self.tokenizer = self.ckpt.tokenizer
        self.config = self.ckpt.config
        self.model = Transformer(self.ckpt, dtype)
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

    def decoder(self, method: str, params: SamplingParams, **opts):
        """ar's decoder, or the speculative step around the method's drafter."""
        cls = method_class(method)
        check_options(method, cls, opts)
        if cls is ARDecoder:
            return ARDecoder(self, params)
        from firp_engine.spec.step import SpecDecoder

        return SpecDecoder(self, params, cls(self, **opts))

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
        dec = self.decoder(method, params, **method_opts)
        results = self._run(dec, list(zip(prompts, prompt_ids)), params, max_new_tokens, stop or [])
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
        dec = self.decoder(method, params, **method_opts)
        run = _Run(self, dec, [("", self.check_length(prompt_ids))], params, max_new_tokens, stop or [])
        text = self.tokenizer.stream_decoder()
        for _, toks in run.events():
            piece = "".join(text.push(t) for t in toks if t not in self.eos)
            if piece:
                yield piece
        tail = text.flush()
        if tail:
            yield tail
        self.last_result = run.out[0]

    def _run(self, dec, reqs, params, max_new, stops) -> list[GenerationResult]:
        run = _Run(self, dec, reqs, params, max_new, stops)
        for _ in run.events():
            pass
        return run.out


class _Run:
    """One batch of requests through one decoder: stop conditions, timing, results."""

    def __init__(self, llm: LLM, dec, reqs, params: SamplingParams, max_new: int, stops: list[str]):
        self.llm, self.dec, self.reqs, self.params = llm, dec, reqs, params
        self.max_new, self.stops = max_new, stops

    def blocks_needed(self, n_prompt: int) -> int:
        """KV blocks a request may hold at most: prompt, new tokens and one step's overshoot
        (a speculative step can commit a few tokens past max_new), within the context."""
        bs = self.llm.cache.block_size
        return -(-min(n_prompt + self.max_new + self.dec.overshoot, self.llm.max_context) // bs)

    def events(self) -> Iterator[tuple[int, list[int]]]:
        """Yield (request index, tokens accepted) as decoding goes; results land in self.out.

        Requests are admitted while their worst-case KV blocks fit the free pool (the rest
        wait for running ones to finish and free theirs), so a large batch never runs out of
        blocks halfway and no work is lost. Non-batched decoders take one request at a time.
        """
        llm, dec, n = self.llm, self.dec, len(self.reqs)
        need = [self.blocks_needed(len(ids)) for _, ids in self.reqs]
        budget = llm.cache.free_blocks
        if n and max(need) > budget:
            raise FirpError(
                f"out of KV blocks: a request may need {max(need)} blocks of {llm.cache.block_size} "
                f"tokens, {budget} are free; raise --kv-blocks or lower max_new_tokens"
            )
        states: list[State | None] = [None] * n
        finish: list[str | None] = [None] * n
        steps, pre_s, dec_s, began = [0] * n, [0.0] * n, [0.0] * n, [0.0] * n
        queue, live = deque(range(n)), []
        with torch.inference_mode():
            try:
                while queue or live:
                    while queue and need[queue[0]] <= budget and (dec.batched or not live):
                        i = queue.popleft()
                        budget -= need[i]
                        t = time.perf_counter()
                        gen = None if self.params.greedy else self.params.generator(i)
                        ids = list(self.reqs[i][1])
                        st = states[i] = State(llm.cache.new_sequence(), ids, len(ids), gen)
                        st.tokens += dec.prefill(st)  # a drafter's first step may accept drafts
                        began[i] = time.perf_counter()
                        pre_s[i] = began[i] - t
                        finish[i] = self._finished(st)
                        yield i, st.tokens[st.n_prompt :]
                        live.append(i)
                    running = [i for i in live if finish[i] is None]
                    new = dec.step([states[i] for i in running]) if running else []
                    for i, toks in zip(running, new):
                        steps[i] += 1
                        st = states[i]
                        st.hist[len(toks)] = st.hist.get(len(toks), 0) + 1
                        before = len(st.tokens)
                        st.tokens += toks
                        finish[i] = self._finished(st)
                        yield i, st.tokens[before:]
                    for i in [i for i in live if finish[i] is not None]:
                        dec_s[i] = time.perf_counter() - began[i] if steps[i] else 0.0
                        states[i].seq.free()  # its blocks go to the requests still waiting
                        budget += need[i]
                        live.remove(i)
            finally:
                for st in states:
                    if st is not None:
                        st.seq.free()
        self.out = [
            self._result(prompt, ids, st, f or "length", k, p, d)
            for (prompt, ids), st, f, k, p, d in zip(self.reqs, states, finish, steps, pre_s, dec_s)
        ]

    def _finished(self, st: State) -> str | None:
        new = st.tokens[st.n_prompt :]
        for j, t in enumerate(new):
            if t in self.llm.eos:
                del st.tokens[st.n_prompt + j + 1 :]
                return "eos"
        if len(new) >= self.max_new:
            del st.tokens[st.n_prompt + self.max_new :]
            return "length"
        if len(st.tokens) >= self.llm.max_context:
            return "context"
        if self.stops:
            text = self.llm.tokenizer.decode(new, skip_special=True)
            if any(s in text for s in self.stops):
                return "stop"
        return None

    def _result(self, prompt, ids, st: State, reason: str, steps: int, pre_s: float, dec_s: float):
        new = st.tokens[st.n_prompt :]
        text = self.llm.tokenizer.decode(new, skip_special=True)
        for s in self.stops:
            if s in text:
                text = text[: text.index(s)]
        return GenerationResult(
            id=None,
            prompt=prompt,
            prompt_ids=list(ids),
            new_ids=new,
            text=text,
            new_tokens=len(new),
            steps=steps,
            mean_accepted=(len(new) - 1) / steps if steps else 0.0,
            prefill_s=pre_s,
            decode_s=dec_s,
            tokens_per_s=len(new) / dec_s if dec_s > 0 else 0.0,
            finish_reason=reason,
            accepted_hist=dict(sorted(st.hist.items())),
        )
