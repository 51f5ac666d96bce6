"""The HTTP side of `firp serve`: OpenAI-compatible routes over one `Engine`.

The routes only validate, queue and stream; the engine thread runs the model. A streamed
response starts once the request's first tokens are there, so that a request that fails
before it produces anything gets a plain error status; a failure after that arrives as an
`{"error": ...}` event, which the openai client raises. A client that goes away (while
waiting or mid-stream) has its request cancelled in the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from firp_engine.errors import FirpError
from firp_engine.sampling import SamplingParams
from firp_engine.scheduler import Request as EngineRequest
from firp_engine.server.engine import Delta, Done, Engine, Failed, Job, QueueFull
from firp_engine.server.schemas import ChatRequest, CompletionRequest, Sampling

ERROR_TYPES = {400: "invalid_request_error", 429: "rate_limit_error"}  # others: "server_error"
RETRY_AFTER_S = 1  # a queue slot frees when a request finishes: soon, on the scale of a client's retry


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def choice(chat: bool, text: str | None, finish: str | None, streamed: bool) -> dict:
    """choices[0] of a chat or text completion (a chunk's, when streamed)."""
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    if streamed:
        msg = {} if text is None else {"content": text}
    else:
        msg = {"role": "assistant", "content": text}
    return {"index": 0, "delta" if streamed else "message": msg, "logprobs": None, "finish_reason": finish}


def usage(done: Done) -> dict:
    n_in, n_out = done.prompt_tokens, done.completion_tokens
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


async def next_item(job: Job, request: Request) -> Delta | Done | Failed | None:
    """The job's next output, or None when the client disconnects first."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    get, watch = asyncio.ensure_future(job.out.get()), asyncio.ensure_future(gone())
    await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if get.done():
        return get.result()
    get.cancel()
    return None


def create_app(engine: Engine, model_name: str) -> FastAPI:
    llm = engine.llm
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="firp-engine", lifespan=lifespan)

    def refuse(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        engine.metrics.request("invalid" if status == 400 else "rejected")
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
        return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
        return refuse(e.status, e.message, e.param, e.code)

    @app.exception_handler(FirpError)
    async def on_firp_error(request: Request, e: FirpError) -> JSONResponse:
        return refuse(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def on_bad_body(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"][1:]) or None  # loc[0] is "body"
        return refuse(400, f"{param or 'body'}: {err['msg']}", param)

    @app.get("/health")
    async def health() -> dict:
        if not engine.alive:
            raise ApiError(503, "the engine is not running")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "firp-engine"}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = engine.metrics.render(engine.gauges())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        if not llm.tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
        try:
            messages = [m.for_template() for m in body.messages]
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        ids = llm.tokenizer.encode_chat(messages)
        return await complete(body, ids, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request", "prompt")
            prompt = prompt[0]
        ids = list(prompt) if isinstance(prompt, list) else llm.tokenizer.encode(prompt)
        if not ids:
            raise ApiError(400, "empty prompt", "prompt")
        if not all(0 <= t < llm.config.vocab_size for t in ids):
            raise ApiError(400, f"token ids must be in [0, {llm.config.vocab_size})", "prompt")
        return await complete(body, ids, request, chat=False)

    async def complete(body: Sampling, ids: list[int], request: Request, chat: bool) -> Response:
        if body.model not in (None, model_name):
            msg = f"model '{body.model}' is not served here (this is '{model_name}')"
            raise ApiError(400, msg, "model", "model_not_found")
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", "n")
        if len(ids) >= llm.max_context:
            msg = f"the prompt is {len(ids)} tokens, not less than the context window ({llm.max_context})"
            raise ApiError(400, msg, "messages" if chat else "prompt", "context_length_exceeded")
        stops = body.stops()
        if not all(stops):
            raise ApiError(400, "stop strings must not be empty", "stop")
        params = SamplingParams(body.temperature, max(body.top_k, 0), body.top_p, body.seed)
        max_new = getattr(body, "max_completion_tokens", None) or body.max_tokens or engine.default_max_tokens
        try:
            job = engine.submit(EngineRequest("", ids, params, max_new, stops), body.stream)
        except QueueFull as e:
            raise ApiError(e.status, str(e), code="queue_full") from None
        first = await next_item(job, request)
        if first is None:  # the client went away while its request waited
            engine.cancel(job)
            return Response(status_code=499)
        if isinstance(first, Failed):  # the engine counted it
            return JSONResponse(error_body(first.status, first.message), status_code=first.status)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        meta = {"id": rid, "created": int(time.time()), "model": model_name}
        if not body.stream:
            assert isinstance(first, Done)  # a job that is not streamed gets no Delta
            kind = "chat.completion" if chat else "text_completion"
            choices = [choice(chat, first.text, first.finish_reason, streamed=False)]
            return JSONResponse({**meta, "object": kind, "choices": choices, "usage": usage(first)})
        events = stream(job, first, meta, chat, body.include_usage)
        headers = {"Cache-Control": "no-cache"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def stream(job: Job, item: Delta | Done | Failed, meta: dict, chat: bool, include_usage: bool):
        """The SSE events of one streamed completion; cancels the job if the stream is cut."""
        head = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
        if include_usage:
            head["usage"] = None  # as OpenAI: only the last chunk carries usage

        def chunk(choice_: dict) -> str:
            return sse({**head, "choices": [choice_]})

        try:
            if chat:  # the role first, as OpenAI streams it
                yield chunk({**choice(chat, "", None, True), "delta": {"role": "assistant", "content": ""}})
            while isinstance(item, Delta):
                yield chunk(choice(chat, item.text, None, streamed=True))
                item = await job.out.get()
            if isinstance(item, Failed):
                yield sse(error_body(item.status, item.message))
            else:
                yield chunk(choice(chat, None, item.finish_reason, streamed=True))
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(item)})
            yield sse("[DONE]")
        finally:
            engine.cancel(job)  # nothing once it has finished

    return app


def serve(engine: Engine, host: str, port: int, model_name: str | None = None) -> None:
    """Run the server until interrupted (`firp serve`)."""
    import uvicorn

    llm = engine.llm
    app = create_app(engine, model_name or Path(llm.source).stem)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
