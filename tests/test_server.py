"""`firp serve` against live servers on loopback, with the official openai client: chat and
text completions (streamed and not), stop strings, OpenAI-style errors, a full queue, clients
that go away, engine failures, greedy output under load, and a bounded load test that ends
with every KV block free. A tiny random model with a real tokenizer and chat template; one
test on the default model."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn
from spec_helpers import random_head
from tiny_models import write_tiny_llama

from firp_engine.generate import LLM
from firp_engine.server.app import create_app
from firp_engine.server.engine import Engine

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
PROMPTS = ["The quick brown fox", "A paged KV cache", "def add(a, b):", "Numbers like 12345", "Speculative"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("srv") / "m")
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    return path


def tiny_llm(folder) -> LLM:
    return LLM(folder, dtype="fp32", max_context=256, kv_blocks=64)


class Live:
    """A server running in a thread of this process, and clients for it."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine, self.url = engine, url
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        pairs = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        return {name: float(value) for name, value in pairs}

    def wait_for(self, name: str, value: float, timeout: float = 20.0) -> dict[str, float]:
        end = time.monotonic() + timeout
        while (m := self.metrics())[name] != value:
            assert time.monotonic() < end, f"{name} = {m[name]}, waited for {value}"
            time.sleep(0.02)
        return m

    def chat(self, prompt: str, **kw):
        kw.setdefault("temperature", 0)
        messages = [{"role": "user", "content": prompt}]
        return self.client.chat.completions.create(model="tiny", messages=messages, **kw)

    def stream_text(self, stream) -> tuple[str, list]:
        """(the text, the chunks) of a streamed chat or text completion."""
        chunks = list(stream)
        choices = [c.choices[0] for c in chunks if c.choices]
        texts = [ch.delta.content if hasattr(ch, "delta") else ch.text for ch in choices]
        return "".join(t or "" for t in texts), chunks


@contextmanager
def serving(llm: LLM, method: str = "ar", opts: dict | None = None, **engine_kw):
    engine = Engine(llm, method, opts, **engine_kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < end and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield Live(engine, f"http://127.0.0.1:{sock.getsockname()[1]}")
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class Throttle:
    """Wraps an engine's decoder step: a gate that holds steps, a delay per step, a failure."""

    def __init__(self, engine: Engine) -> None:
        dec = engine.sched.dec
        self.step, self.calls, self.fail_at, self.delay = dec.step, 0, None, 0.0
        self.widest = 0  # most sequences one step ran
        self.gate = threading.Event()
        self.gate.set()
        dec.step = self

    def __call__(self, states):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        self.gate.wait()
        time.sleep(self.delay)
        self.widest = max(self.widest, len(states))
        return self.step(states)


@pytest.fixture(scope="module")
def ref(folder):
    """Plain greedy decoding of PROMPTS through the library (no server): the reference."""
    llm = tiny_llm(folder)
    return {p: llm.generate(p, max_new_tokens=24)[0] for p in PROMPTS}


@pytest.fixture(scope="module")
def live(folder):
    with serving(tiny_llm(folder), max_batch=4, max_queue=16) as s:
        yield s


# ---------------------------------------------------------------- completions


def test_chat_plain_and_streamed(live, ref):
    p = PROMPTS[0]
    r = live.chat(p, max_tokens=24)
    want = ref[p]
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[want.finish_reason]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_ids), want.new_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = live.chat(p, max_tokens=24, stream=True, stream_options={"include_usage": True})
    text, chunks = live.stream_text(stream)
    assert text == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.new_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_plain_and_streamed(live, folder):
    llm = tiny_llm(folder)
    want = llm.generate("The quick brown", chat=False, max_new_tokens=16)[0]
    r = live.client.completions.create(model="tiny", prompt="The quick brown", max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_ids), want.new_tokens)
    kw = dict(model="tiny", max_tokens=16, temperature=0, stream=True)
    text, chunks = live.stream_text(live.client.completions.create(prompt="The quick brown", **kw))
    assert text == want.text and chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    ids = live.client.completions.create(prompt=want.prompt_ids, **{**kw, "stream": False})
    assert ids.choices[0].text == want.text  # a prompt of token ids


def test_models_health_metrics(live):
    assert [m.id for m in live.client.models.list()] == ["tiny"]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    live.chat(PROMPTS[1], max_tokens=4)
    text = httpx.get(live.url + "/metrics").text
    assert "# TYPE firp_step_seconds histogram" in text
    m = live.metrics()
    assert m['firp_step_seconds_bucket{le="+Inf"}'] == m["firp_step_seconds_count"] > 0
    assert m["firp_prompt_tokens_total"] > 0 and m["firp_completion_tokens_total"] > 0
    assert m['firp_mean_accepted_tokens{method="ar"}'] == 1.0
    assert m["firp_kv_blocks_used"] == 0 and m["firp_kv_blocks_free"] == 64


def test_stop_strings(live, ref):
    p = PROMPTS[2]
    full = ref[p].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    want = full[: full.index(stop)]
    r = live.chat(p, max_tokens=24, stop=[stop, "never appears"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    text, chunks = live.stream_text(live.chat(p, max_tokens=24, stop=stop, stream=True))
    assert text == want and chunks[-1].choices[0].finish_reason == "stop"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"model": "gpt-4"}, "model"),
        ({"n": 2}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "the quick brown fox " * 80}]}, "messages"),
    ],
)
def test_bad_requests_are_400(live, kw, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **kw}
    with pytest.raises(openai.BadRequestError) as e:
        live.client.chat.completions.create(**body)
    err = e.value.body
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    if param == "model":
        assert err["code"] == "model_not_found"


def test_full_queue_429_and_client_gone_while_queued(folder):
    """max_batch 1, max_queue 1: one request running (its steps held), one waiting, the
    next refused with 429 and Retry-After; a queued client that leaves is cancelled."""
    with serving(tiny_llm(folder), max_batch=1, max_queue=1) as live:
        hold = Throttle(live.engine)
        hold.gate.clear()
        pool = ThreadPoolExecutor(4)
        a = pool.submit(live.chat, PROMPTS[0], max_tokens=5)
        live.wait_for("firp_running_requests", 1)
        b = pool.submit(live.chat, PROMPTS[1], max_tokens=5)
        live.wait_for("firp_queue_length", 1)
        with pytest.raises(openai.RateLimitError) as e:
            live.chat(PROMPTS[2], max_tokens=5)
        assert e.value.response.status_code == 429 and e.value.response.headers["retry-after"] == "1"
        assert e.value.body["code"] == "queue_full"
        hold.gate.set()
        assert a.result().usage.completion_tokens > 0 and b.result().usage.completion_tokens > 0

        hold.gate.clear()
        a = pool.submit(live.chat, PROMPTS[0], max_tokens=5)
        live.wait_for("firp_running_requests", 1)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        with pytest.raises(httpx.ReadTimeout):  # leaves while queued
            httpx.post(live.url + "/v1/chat/completions", json=body, timeout=0.5)
        m = live.wait_for('firp_requests_total{outcome="cancelled"}', 1)
        assert m["firp_queue_length"] == 0
        hold.gate.set()
        a.result()
        m = live.wait_for("firp_kv_blocks_used", 0)
        assert m['firp_requests_total{outcome="rejected"}'] == 1
        assert m['firp_requests_total{outcome="completed"}'] == 3


def test_disconnect_mid_stream_frees_blocks(folder):
    with serving(tiny_llm(folder)) as live:
        Throttle(live.engine).delay = 0.05  # 200 tokens would take 10 s
        stream = live.chat(PROMPTS[3], max_tokens=200, stream=True, temperature=1.0, seed=1)
        for _, _chunk in zip(range(4), stream, strict=False):
            pass
        assert live.metrics()["firp_kv_blocks_used"] > 0
        stream.close()
        t = time.monotonic()
        m = live.wait_for("firp_kv_blocks_used", 0, timeout=5)
        assert time.monotonic() - t < 5
        assert m['firp_requests_total{outcome="cancelled"}'] == 1
        assert m["firp_running_requests"] == 0


def test_engine_failure_is_500_and_the_server_lives_on(folder):
    with serving(tiny_llm(folder)) as live:
        throttle = Throttle(live.engine)
        throttle.fail_at = 1  # the first step: before any token
        with pytest.raises(openai.InternalServerError) as e:
            live.chat(PROMPTS[0], max_tokens=8)
        assert "injected failure" in e.value.body["message"] and e.value.body["type"] == "server_error"
        throttle.fail_at = throttle.calls + 3  # mid-stream: an error event
        with pytest.raises(openai.APIError, match="injected failure"):
            live.stream_text(live.chat(PROMPTS[0], max_tokens=20, stream=True))
        r = live.chat(PROMPTS[0], max_tokens=8)
        assert r.usage.completion_tokens > 0
        m = live.wait_for("firp_kv_blocks_used", 0)
        assert m['firp_requests_total{outcome="failed"}'] == 2
        assert httpx.get(live.url + "/health").status_code == 200


# ---------------------------------------------------------------- batching


def concurrently(live: Live, prompts: list[str], max_tokens: int) -> list[str]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        rs = list(pool.map(lambda p: live.chat(p, max_tokens=max_tokens), prompts))
    return [r.choices[0].message.content for r in rs]


@pytest.mark.parametrize("method", ["ar", "firp"])
def test_greedy_under_load_equals_alone(folder, ref, method):
    """Each request, decoded beside others (requests joining and leaving at step boundaries),
    gives the same text as alone; and FIRP's is plain greedy decoding's."""
    llm = tiny_llm(folder)
    opts = {"head": random_head(llm, layer=1, k=3, seed=1)} if method == "firp" else {}
    with serving(llm, method, opts, max_batch=3) as live:
        alone = [live.chat(p, max_tokens=24).choices[0].message.content for p in PROMPTS]
        steps = Throttle(live.engine)
        steps.delay = 0.002  # so that requests overlap
        loaded = concurrently(live, PROMPTS * 2, 24)
        m = live.wait_for("firp_kv_blocks_used", 0)
    assert steps.widest == 3
    assert loaded == alone * 2
    assert alone == [ref[p].text for p in PROMPTS]
    if method == "firp":
        assert m['firp_mean_accepted_tokens{method="firp"}'] >= 1.0


def test_load(folder):
    """16 clients x 10 requests of mixed lengths, streamed or not, some abandoned mid-stream,
    against max_batch 4 and a queue of 8: each request is answered or refused with 429, and at
    the end no KV block is in use and the server's counts match the clients'."""
    with serving(tiny_llm(folder), max_batch=4, max_queue=8) as live:

        def client(c: int) -> Counter:
            seen: Counter = Counter()
            for i in range(10):
                n, kind = 1 + (7 * c + 3 * i) % 40, (c + i) % 4
                try:
                    if kind == 0:  # abandoned after a chunk
                        stream = live.chat(PROMPTS[i % 5], max_tokens=n + 8, stream=True)
                        next(iter(stream))
                        stream.close()
                        seen["abandoned"] += 1
                        continue
                    if kind == 1:
                        text, chunks = live.stream_text(live.chat(PROMPTS[i % 5], max_tokens=n, stream=True))
                        reason = chunks[-1].choices[0].finish_reason
                    else:
                        r = live.chat(PROMPTS[(c + i) % 5], max_tokens=n, temperature=0.8, seed=c * 10 + i)
                        reason = r.choices[0].finish_reason
                        assert 1 <= r.usage.completion_tokens <= n
                    assert reason in ("stop", "length")
                    seen["completed"] += 1
                except openai.RateLimitError:
                    seen["rejected"] += 1
            return seen

        with ThreadPoolExecutor(16) as pool:
            seen = sum(pool.map(client, range(16)), Counter())
        m = live.wait_for("firp_kv_blocks_used", 0)
    assert sum(seen.values()) == 160
    done = {o: m[f'firp_requests_total{{outcome="{o}"}}'] for o in ("completed", "cancelled", "rejected")}
    assert done["rejected"] == seen["rejected"]
    # an abandoned stream is cancelled, unless it finished before the server saw the client go
    assert done["completed"] + done["cancelled"] == seen["completed"] + seen["abandoned"]
    assert done["completed"] >= seen["completed"]
    assert m["firp_queue_length"] == m["firp_running_requests"] == 0
    assert m['firp_requests_total{outcome="failed"}'] == m['firp_requests_total{outcome="invalid"}'] == 0


def test_default_model_firp_matches_plain(default_llm):
    """The default model with its shipped FIRP head: two chats at once, greedy, equal plain
    decoding of each alone (fp32)."""
    prompts = ["What is a hash table?", "Name three colors."]
    want = [r.text for r in default_llm.generate(prompts, max_new_tokens=12)]
    with serving(default_llm, "firp") as live:
        with ThreadPoolExecutor(2) as pool:
            rs = list(pool.map(lambda p: live.chat(p, max_tokens=12), prompts))
    assert [r.choices[0].message.content for r in rs] == want


def test_firp_serve_command(folder):
    """`firp serve` starts, answers, and stops cleanly on Ctrl-C."""
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "firp_engine.cli", "serve", "--model", str(folder), "--dtype", "fp32",
           "--port", str(port), "--max-new-tokens", "3", "--served-model-name", "tiny"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < end, proc.stdout.read() if proc.poll() else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="tiny", prompt="The quick", temperature=0)
        assert r.usage.completion_tokens == 3  # --max-new-tokens: the default max_tokens
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
