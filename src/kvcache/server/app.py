"""The OpenAI-compatible HTTP API on one engine loop, with metrics and a live view of the cache."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvcache.config import SamplingParams
from kvcache.engine.engine import RequestOutput
from kvcache.server.engine_loop import EngineLoop
from kvcache.server.metrics import Metrics
from kvcache.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body
from kvcache.server.responses import (StreamState, base, chat_logprobs, completion_logprobs, sse, stream_deltas,
                                      usage)

DEFAULT_MAX_BODY = 4 << 20  # 4 MiB


class _ClientGone(Exception):
    pass


def create_app(loop: EngineLoop, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    engine = loop.engine
    tokenizer = engine.tokenizer
    metrics = Metrics(lambda: loop.last_stats)
    loop.on_finished = metrics.observe
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="kvcache", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                err = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                               code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body_bytes:
            raise APIError(413, f"The request body is larger than {max_body_bytes} bytes.")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"The request body is larger than {max_body_bytes} bytes.")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'.",
                           "model", "model_not_found")

    def sampling(req, max_tokens: int, logprobs: int | None, prompt_len: int) -> SamplingParams:
        if prompt_len + max_tokens > engine.max_model_len:
            raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens; "
                                f"you asked for {prompt_len + max_tokens} ({prompt_len} in the prompt, "
                                f"{max_tokens} for the completion). Shorten the prompt or lower max_tokens.",
                           "max_tokens", "context_length_exceeded")
        try:
            return SamplingParams(n=req.n, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos,
                                  logprobs=logprobs, cache_salt=req.cache_salt)
        except ValueError as err:
            raise APIError(400, str(err)) from None

    async def submit(request_id: str, ids: list[int], params: SamplingParams):
        try:
            return await loop.add(request_id, ids, params)
        except ValueError as err:
            raise APIError(400, str(err)) from None

    async def final_output(outputs: asyncio.Queue, request: Request, request_id: str) -> RequestOutput:
        while True:
            try:
                out = await asyncio.wait_for(outputs.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    loop.abort(request_id)
                    raise _ClientGone() from None
                continue
            if isinstance(out, Exception):
                raise APIError(500, "The engine failed on this request.", type_="server_error")
            if out.finished:
                return out

    @app.exception_handler(_ClientGone)
    async def client_gone(_: Request, __: _ClientGone) -> Response:
        return Response(status_code=499)

    # --- routes ----------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "kvcache", "max_model_len": engine.max_model_len}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/state")
    async def state() -> dict[str, Any]:
        snapshot = await asyncio.wrap_future(loop.call(engine.cache_snapshot))
        return snapshot | {"history": loop.history.points, "model": model_name}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("kvcache.server").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_body(await read_body(request), CompletionRequest)
        check_model(req.model)
        req.check_unsupported()
        if req.echo:
            raise APIError(400, "echo is not supported by this server.", "echo")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "Send one prompt per request (this server takes a string or token ids).",
                               "prompt")
            prompt = prompt[0]
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "The prompt is empty.", "prompt")
        params = sampling(req, req.max_tokens or 16, req.logprobs, len(ids))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = await submit(request_id, ids, params)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(event_stream(outputs, request_id, "text_completion", include_usage,
                                                  completion_choices(req.logprobs)), media_type="text/event-stream")
        out = await final_output(outputs, request, request_id)
        choices = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                    "logprobs": completion_logprobs(tokenizer, c.logprobs) if req.logprobs is not None else None}
                   for c in out.outputs]
        return base("text_completion", request_id, model_name) | {"choices": choices, "usage": usage(out)}

    async def event_stream(outputs: asyncio.Queue, request_id: str, kind: str, include_usage: bool,
                           choices_for: Callable[[StreamState, RequestOutput], Iterator[dict]]) -> AsyncIterator[str]:
        """Server-sent events for one request; aborts it if the client goes away before the end."""
        final, created = None, int(time.time())
        state = StreamState()
        try:
            while True:
                out = await outputs.get()
                if isinstance(out, Exception):
                    yield sse(APIError(500, "The engine failed on this request.", type_="server_error").body())
                    break
                state.widen(len(out.outputs))
                for choice in choices_for(state, out):
                    yield sse(base(kind, request_id, model_name, created) | {"choices": [choice]})
                if out.finished:
                    final = out
                    break
            if final is not None and include_usage:
                yield sse(base(kind, request_id, model_name, created) | {"choices": [], "usage": usage(final)})
            yield "data: [DONE]\n\n"
        finally:
            if final is None:
                loop.abort(request_id)

    def completion_choices(logprobs: int | None) -> Callable[[StreamState, RequestOutput], Iterator[dict]]:
        def choices(state: StreamState, out: RequestOutput) -> Iterator[dict]:
            for i, text, first, reason in stream_deltas(state, out):
                lp = completion_logprobs(tokenizer, out.outputs[i].logprobs, first) if logprobs is not None else None
                yield {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
        return choices

    def chat_choices(logprobs: bool) -> Callable[[StreamState, RequestOutput], Iterator[dict]]:
        def choices(state: StreamState, out: RequestOutput) -> Iterator[dict]:
            for i, text, first, reason in stream_deltas(state, out):
                delta: dict[str, Any] = {"content": text} if text else {}
                if not state.started[i]:
                    delta = {"role": "assistant", "content": text}
                    state.started[i] = True
                if delta:
                    lp = chat_logprobs(tokenizer, out.outputs[i].logprobs, first) if logprobs else None
                    yield {"index": i, "delta": delta, "logprobs": lp, "finish_reason": None}
                if reason:
                    yield {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}
        return choices

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_body(await read_body(request), ChatCompletionRequest)
        check_model(req.model)
        req.check_unsupported()
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as err:
            raise APIError(400, str(err), "messages") from None
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, engine.max_model_len - len(ids))
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling(req, max_tokens, top, len(ids))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = await submit(request_id, ids, params)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(event_stream(outputs, request_id, "chat.completion.chunk", include_usage,
                                                  chat_choices(top is not None)), media_type="text/event-stream")
        out = await final_output(outputs, request, request_id)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(tokenizer, c.logprobs) if top is not None else None,
                    "finish_reason": c.finish_reason} for c in out.outputs]
        return base("chat.completion", request_id, model_name) | {"choices": choices, "usage": usage(out)}

    return app

