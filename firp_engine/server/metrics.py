"""The server's counters, written out in the Prometheus text format (version 0.0.4).

The engine thread counts steps and tokens, the web layer counts refused requests; one lock
keeps the two apart. Gauges that describe the engine right now (queue, KV blocks) are read
when /metrics is asked for and passed to `render`.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque

# Upper bounds (seconds) of the step latency histogram: a CPU step of a small model takes
# tens of milliseconds, a large batch or a long prefill seconds.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATE_WINDOW_S = 10.0  # tokens/s is measured over the last this many seconds

OUTCOMES = ("completed", "cancelled", "failed", "rejected", "invalid")


class Metrics:
    def __init__(self, method: str) -> None:
        self.method = method
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter({o: 0 for o in OUTCOMES})
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.decode_tokens = 0  # tokens of decode steps (not prefill), per sequence
        self.seq_steps = 0  # decode steps, per sequence: decode_tokens / seq_steps = accepted per step
        self.step_buckets = [0] * len(STEP_BUCKETS)
        self.step_count = 0
        self.step_sum = 0.0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the steps in the window

    def request(self, outcome: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        with self.lock:
            self.requests[outcome] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def step(self, seconds: float, tokens: int, decode_tokens: int, seq_steps: int) -> None:
        """One scheduler step: its latency, all tokens it produced, and those of decode steps."""
        now = time.monotonic()
        with self.lock:
            i = bisect.bisect_left(STEP_BUCKETS, seconds)
            if i < len(STEP_BUCKETS):
                self.step_buckets[i] += 1
            self.step_count += 1
            self.step_sum += seconds
            self.decode_tokens += decode_tokens
            self.seq_steps += seq_steps
            self.recent.append((now, tokens))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    def tokens_per_s(self) -> float:
        with self.lock:
            self._trim(time.monotonic())
            return sum(n for _, n in self.recent) / RATE_WINDOW_S

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The text exposition; gauges: name -> (help, value), read by the caller just now."""
        rate = self.tokens_per_s()
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP firp_{name} {help_}")
            out.append(f"# TYPE firp_{name} {kind}")
            out.extend(f"firp_{name}{labels} {value:g}" for labels, value in samples)

        with self.lock:
            outcomes = [(f'{{outcome="{o}"}}', n) for o, n in sorted(self.requests.items())]
            metric("requests_total", "counter", "Requests by outcome.", outcomes)
            tokens_in, tokens_out = [("", self.prompt_tokens)], [("", self.completion_tokens)]
            metric("prompt_tokens_total", "counter", "Prompt tokens of completed requests.", tokens_in)
            metric(
                "completion_tokens_total", "counter", "Tokens generated for completed requests.", tokens_out
            )
            mean = self.decode_tokens / self.seq_steps if self.seq_steps else 0.0
            metric(
                "mean_accepted_tokens",
                "gauge",
                "Mean tokens per decode step and sequence, by method.",
                [(f'{{method="{self.method}"}}', mean)],
            )
            cumulative, samples = 0, []
            for le, n in zip(STEP_BUCKETS, self.step_buckets, strict=True):
                cumulative += n
                samples.append((f'_bucket{{le="{le:g}"}}', cumulative))
            n = self.step_count
            samples += [('_bucket{le="+Inf"}', n), ("_sum", self.step_sum), ("_count", n)]
            metric("step_seconds", "histogram", "Latency of one scheduler step (all requests).", samples)
        window = f"Tokens generated per second over the last {RATE_WINDOW_S:g} s."
        metric("tokens_per_second", "gauge", window, [("", rate)])
        for name, (help_, value) in gauges.items():
            metric(name, "gauge", help_, [("", value)])
        return "\n".join(out) + "\n"
