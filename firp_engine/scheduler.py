"""Requests in flight through one decoder: admission, steps, stop conditions, results.

A `Scheduler` drives one decoder (plain `ar`, or the speculative step around a drafter).
Requests join at any step boundary (`add`; the server adds them as they arrive, `LLM.generate`
all at once) and leave when they finish or are cancelled. A request is admitted only while
its worst-case KV blocks (prompt + max new tokens + one step's overshoot) fit beside those
of the running ones, so no request runs out of blocks halfway and none is lost: the rest
wait in order. `step()` admits what fits (prefilling it), runs one decode step of every
running request and reports the tokens each one got.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field

import torch

from firp_engine.errors import FirpError
from firp_engine.kv_cache import Sequence
from firp_engine.sampling import SamplingParams


@dataclass
class State:
    """One request in flight."""

    seq: Sequence
    tokens: list[int]  # prompt + accepted tokens; the last one is not in the cache yet
    n_prompt: int
    gen: torch.Generator | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
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


@dataclass
class Request:
    prompt: str  # the text, for results (may be empty when only ids are given)
    ids: list[int]  # prompt token ids
    params: SamplingParams
    max_new: int
    stops: list[str] = field(default_factory=list)
    index: int = 0  # its random stream is params.generator(index): seed + index


@dataclass
class Event:
    rid: int
    tokens: list[int]  # tokens this request got in this step (after stop trimming)
    finish: str | None  # "eos", "length", "stop", "context", "cancelled" or None (running)


@dataclass
class _Entry:
    req: Request
    need: int  # worst-case KV blocks
    st: State | None = None
    finish: str | None = None
    steps: int = 0
    prefill_s: float = 0.0
    began: float = 0.0
    decode_s: float = 0.0


class Scheduler:
    def __init__(self, llm, dec) -> None:
        self.llm, self.dec = llm, dec
        self.capacity = llm.cache.free_blocks  # blocks this scheduler may hand out
        self.reserved = 0  # worst-case blocks of the running requests
        self.entries: dict[int, _Entry] = {}
        self.queue: deque[int] = deque()
        self.live: list[int] = []
        self._next = 0

    @property
    def idle(self) -> bool:
        return not self.queue and not self.live

    def blocks_needed(self, req: Request) -> int:
        """KV blocks a request may hold at most: prompt, new tokens and one step's overshoot
        (a speculative step can commit a few tokens past max_new), within the context."""
        bs = self.llm.cache.block_size
        return -(-min(len(req.ids) + req.max_new + self.dec.overshoot, self.llm.max_context) // bs)

    def add(self, req: Request) -> int:
        """Queue a request; returns its id. One that could never fit is refused now."""
        if req.max_new < 1:
            raise FirpError(f"max new tokens must be >= 1, got {req.max_new}")
        need = self.blocks_needed(req)
        if need > self.capacity:
            raise FirpError(
                f"out of KV blocks: the request may need {need} blocks of {self.llm.cache.block_size} "
                f"tokens, {self.capacity} exist; raise --kv-blocks or lower max_new_tokens"
            )
        rid, self._next = self._next, self._next + 1
        self.entries[rid] = _Entry(req, need)
        self.queue.append(rid)
        return rid

    def cancel(self, rid: int) -> None:
        """Drop a request now (a client went away): its blocks return to the pool at once."""
        e = self.entries[rid]
        if e.finish is not None:
            return
        if rid in self.queue:
            self.queue.remove(rid)
        e.finish = "cancelled"
        self._retire(rid)

    def step(self) -> list[Event]:
        """Admit the requests that fit (prefill gives each its first tokens), then one step of
        every running request. Returns what each request got."""
        events = []
        while self.queue and self._fits(self.entries[self.queue[0]]):
            rid = self.queue.popleft()
            e = self.entries[rid]
            self.reserved += e.need
            self.live.append(rid)
            t = time.perf_counter()
            r = e.req
            gen = None if r.params.greedy else r.params.generator(r.index)
            e.st = State(self.llm.cache.new_sequence(), list(r.ids), len(r.ids), gen, r.params)
            e.st.tokens += self.dec.prefill(e.st)  # a drafter's first step may accept drafts
            e.began = time.perf_counter()
            e.prefill_s = e.began - t
            events.append(self._event(rid, len(r.ids)))
        running = [rid for rid in self.live if self.entries[rid].finish is None]
        if running:
            new = self.dec.step([self.entries[rid].st for rid in running])
            for rid, toks in zip(running, new, strict=True):
                e = self.entries[rid]
                e.steps += 1
                e.st.hist[len(toks)] = e.st.hist.get(len(toks), 0) + 1
                before = len(e.st.tokens)
                e.st.tokens += toks
                events.append(self._event(rid, before))
        for rid in [rid for rid in self.live if self.entries[rid].finish is not None]:
            self._retire(rid)
        return events

    def _fits(self, e: _Entry) -> bool:
        return self.reserved + e.need <= self.capacity and (self.dec.batched or not self.live)

    def _event(self, rid: int, before: int) -> Event:
        e = self.entries[rid]
        e.finish = self._finished(e)
        return Event(rid, e.st.tokens[before:], e.finish)

    def _retire(self, rid: int) -> None:
        e = self.entries[rid]
        if rid in self.live:
            self.live.remove(rid)
            self.reserved -= e.need
        if e.st is not None:
            e.decode_s = time.perf_counter() - e.began if e.steps else 0.0
            e.st.seq.free()  # its blocks go to the requests still waiting

    def forget(self, rid: int) -> None:
        """Drop a finished request's record (a long-lived scheduler, as a server's, would
        otherwise keep every request it ever ran)."""
        assert self.entries[rid].finish is not None, "only a finished request is forgotten"
        del self.entries[rid]

    def close(self) -> None:
        """Free every sequence (after an error, so that the pool is whole again)."""
        for rid in list(self.live):
            self._retire(rid)

    def _finished(self, e: _Entry) -> str | None:
        st, req = e.st, e.req
        new = st.tokens[st.n_prompt :]
        for j, t in enumerate(new):
            if t in self.llm.eos:
                del st.tokens[st.n_prompt + j + 1 :]
                return "eos"
        if len(new) >= req.max_new:
            del st.tokens[st.n_prompt + req.max_new :]
            return "length"
        if len(st.tokens) >= self.llm.max_context:
            return "context"
        if req.stops:
            text = self.llm.tokenizer.decode(new, skip_special=True)
            if any(s in text for s in req.stops):
                return "stop"
        return None

    def result(self, rid: int) -> GenerationResult:
        e = self.entries[rid]
        req, st = e.req, e.st
        new = st.tokens[st.n_prompt :] if st is not None else []
        text = self.llm.tokenizer.decode(new, skip_special=True)
        for s in req.stops:
            if s in text:
                text = text[: text.index(s)]
        return GenerationResult(
            id=rid,
            prompt=req.prompt,
            prompt_ids=list(req.ids),
            new_ids=new,
            text=text,
            new_tokens=len(new),
            steps=e.steps,
            mean_accepted=(len(new) - 1) / e.steps if e.steps else 0.0,
            prefill_s=e.prefill_s,
            decode_s=e.decode_s,
            tokens_per_s=len(new) / e.decode_s if e.decode_s > 0 else 0.0,
            finish_reason=e.finish or "length",
            accepted_hist=dict(sorted(st.hist.items())) if st is not None else {},
        )
