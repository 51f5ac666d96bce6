"""The server's engine: one thread owns the model and a `Scheduler`; the web layer hands it jobs.

Jobs come from the asyncio thread (`submit`, `cancel`) and wait in a bounded queue; at each
step boundary the engine moves them into the scheduler while fewer than `max_batch` are
there (the scheduler starts each one when its worst-case KV blocks fit). After each step
it turns every request's new tokens into text and posts it to the request's asyncio.Queue
with `loop.call_soon_threadsafe`. An exception inside a step fails the requests that were
running (500) and the engine goes on with a fresh scheduler: no request is left waiting.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from firp_engine.errors import FirpError
from firp_engine.scheduler import Request, Scheduler
from firp_engine.server.metrics import Metrics

log = logging.getLogger("firp.server")

# The scheduler's finish reasons as OpenAI names them.
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


class QueueFull(Exception):
    """The bounded queue is full (429), or the engine is shutting down (503)."""

    def __init__(self, message: str, status: int = 429) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Delta:
    text: str  # the next piece of the completion


@dataclass
class Done:
    text: str  # the whole completion, cut before the first stop string
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    status: int
    message: str


class TextStream:
    """A request's text as its tokens come: never splits a UTF-8 character, and holds back
    the last len(longest stop) - 1 characters, which may be the start of a stop string (the
    scheduler ends a request in the step whose text first contains one, so no earlier text
    can belong to it). The final push cuts the text before the first stop, as
    `Scheduler.result` does."""

    def __init__(self, tokenizer, eos: set[int], stops: list[str]) -> None:
        self.decoder = tokenizer.stream_decoder()
        self.eos, self.stops = eos, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0  # characters handed out
        self.stopped = False  # finish found a stop string

    def push(self, tokens: list[int], final: bool = False) -> str:
        """The text that the new tokens make safe to send (all of the rest when final)."""
        self.text += "".join(self.decoder.push(t) for t in tokens if t not in self.eos)
        end = max(self.sent, len(self.text) - self.hold)
        if final:
            self.text += self.decoder.flush()
            cut = min((i for s in self.stops if (i := self.text.find(s)) >= 0), default=len(self.text))
            self.stopped = cut < len(self.text)
            self.text, end = self.text[:cut], cut
        piece, self.sent = self.text[self.sent : end], end
        return piece


@dataclass
class Job:
    """One request, as both threads see it. `out` receives Delta* then Done, or Failed
    (non-streamed jobs get Done or Failed only)."""

    req: Request
    stream: bool
    loop: asyncio.AbstractEventLoop
    text: TextStream
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    rid: int | None = None  # its id in the scheduler, once there
    new_tokens: int = 0
    started: bool = False  # its first (prefill) event came
    finished: bool = False  # by the engine thread, or by `cancel` while it waits (under the lock)

    def post(self, item: Delta | Done | Failed) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass


class Engine:
    def __init__(
        self,
        llm,
        method: str = "ar",
        method_opts: dict | None = None,
        max_batch: int = 8,
        max_queue: int = 64,
        default_max_tokens: int = 256,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or default_max_tokens < 1:
            raise FirpError("--max-batch, --max-queue and --max-new-tokens must be >= 1")
        self.llm, self.method = llm, method
        self.sched = Scheduler(llm, llm.decoder(method, **(method_opts or {})))
        self.max_batch, self.max_queue = max_batch, max_queue
        self.default_max_tokens = default_max_tokens
        self.metrics = Metrics(method)
        self.cond = threading.Condition()  # guards waiting, cancels and closing
        self.waiting: deque[Job] = deque()
        self.cancels: list[Job] = []
        self.closing = False
        self.jobs: dict[int, Job] = {}  # jobs in the scheduler, by rid (engine thread only)
        self.thread = threading.Thread(target=self._run, name="firp-engine", daemon=True)

    # ------------------------------------------------------------ the web layer's side

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.closing

    def submit(self, req: Request, stream: bool) -> Job:
        """Queue a request (from the event loop). Raises FirpError for a request that could
        never run (400), QueueFull when the queue is full (429) or the engine stops (503)."""
        need = self.sched.blocks_needed(req)
        if need > self.sched.capacity:
            raise FirpError(
                f"the request may need {need} KV blocks of {self.llm.cache.block_size} tokens and the "
                f"server has {self.sched.capacity}: shorten the prompt or lower max_tokens"
            )
        text = TextStream(self.llm.tokenizer, self.llm.eos, req.stops)
        job = Job(req, stream, asyncio.get_running_loop(), text)
        with self.cond:
            if self.closing:
                raise QueueFull("the server is shutting down", status=503)
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self.waiting.append(job)
            self.cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job whose client went away: now if it is still waiting, else at the next
        step boundary (which frees its blocks)."""
        with self.cond:
            if job.finished:
                return
            if job.rid is None:  # only the engine thread moves it on, under this lock
                self.waiting.remove(job)
                job.finished = True
                self.metrics.request("cancelled")
            else:
                self.cancels.append(job)
                self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join()

    def gauges(self) -> dict[str, tuple[str, float]]:
        """Engine state for /metrics (racy reads of list lengths: fine for a gauge)."""
        cache = self.llm.cache
        return {
            "queue_length": ("Requests waiting to start.", len(self.waiting) + len(self.sched.queue)),
            "running_requests": ("Requests decoding.", len(self.sched.live)),
            "kv_blocks_used": ("KV cache blocks in use.", cache.num_blocks - cache.free_blocks),
            "kv_blocks_free": ("KV cache blocks free.", cache.free_blocks),
        }

    # ------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    if not self._iterate():
                        break
                except Exception as e:
                    self._recover(e)
        with self.cond:
            left, self.waiting = list(self.jobs.values()) + list(self.waiting), deque()
        self._fail(left, 503, "the server is shutting down")
        self.sched.close()

    def _iterate(self) -> bool:
        """Take cancels and new jobs in at this step boundary, then one step. False: closing."""
        with self.cond:
            while not (self.closing or self.waiting or self.cancels or self.jobs):
                self.cond.wait()
            if self.closing:
                return False
            cancels, self.cancels = self.cancels, []
            for job in cancels:
                self._cancel(job)
            while self.waiting and len(self.jobs) < self.max_batch:
                self._admit(self.waiting.popleft())
        if self.jobs:
            self._step()
        return True

    def _admit(self, job: Job) -> None:
        try:
            job.rid = self.sched.add(job.req)
        except FirpError as e:  # submit checked it; kept so that no job is ever lost
            self._fail([job], 400, str(e))
            return
        self.jobs[job.rid] = job

    def _cancel(self, job: Job) -> None:
        if job.finished:
            return
        self.sched.cancel(job.rid)
        self._forget(job)
        job.finished = True
        self.metrics.request("cancelled")

    def _forget(self, job: Job) -> None:
        self.sched.forget(job.rid)
        del self.jobs[job.rid]

    def _fail(self, jobs: list[Job], status: int, message: str) -> None:
        for job in jobs:
            job.finished = True
            job.post(Failed(status, message))
            self.metrics.request("failed")

    def _step(self) -> None:
        t = time.perf_counter()
        events = self.sched.step()
        took = time.perf_counter() - t
        tokens = decode_tokens = seq_steps = 0
        for ev in events:
            job = self.jobs[ev.rid]
            tokens += len(ev.tokens)
            if job.started:
                decode_tokens, seq_steps = decode_tokens + len(ev.tokens), seq_steps + 1
            job.started = True
            self._deliver(job, ev.tokens, ev.finish)
        self.metrics.step(took, tokens, decode_tokens, seq_steps)

    def _deliver(self, job: Job, tokens: list[int], finish: str | None) -> None:
        job.new_tokens += len(tokens)
        piece = job.text.push(tokens, final=finish is not None)
        if piece and job.stream:
            job.post(Delta(piece))
        if finish is None:
            return
        n_prompt = len(job.req.ids)
        reason = "stop" if job.text.stopped else FINISH[finish]  # a stop string may end a "length" step
        job.post(Done(job.text.text, reason, n_prompt, job.new_tokens))
        job.finished = True
        self._forget(job)
        self.metrics.request("completed", n_prompt, job.new_tokens)

    def _recover(self, e: Exception) -> None:
        """A step (or the bookkeeping around it) raised: fail the running requests, free every
        sequence, and start a fresh scheduler on the same decoder; requests not yet started
        are queued there again."""
        log.exception("engine step failed")
        sched = self.sched
        queued = [self.jobs[rid] for rid in sched.queue]
        running = [job for job in self.jobs.values() if job not in queued]
        sched.close()
        self.jobs.clear()
        self.sched = Scheduler(self.llm, sched.dec)
        self._fail(running, 500, f"internal error in the engine: {type(e).__name__}: {e}")
        for job in queued:
            self._admit(job)
