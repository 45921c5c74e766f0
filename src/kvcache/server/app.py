"""The OpenAI-compatible HTTP API on one engine loop, with metrics and a live view of the cache."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib import resources
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from kvcache.config import SamplingParams
from kvcache.engine.engine import RequestOutput
from kvcache.server.engine_loop import EngineLoop
from kvcache.server.metrics import Metrics
from kvcache.server.middleware import CatchAll, RequireKey
from kvcache.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, Limits, parse_body
from kvcache.server.responses import (StreamState, base, chat_logprobs, completion_logprobs, sse, stream_deltas,
                                      usage)

log = logging.getLogger("kvcache.server")
OPEN_PATHS = ("/health", "/")  # answer without the API key: liveness, and the page's static HTML
BODY_TIMEOUT = 30.0  # seconds a client may take to send its whole request body
DISCONNECT_POLL = 0.25  # seconds between checks that a non-streaming client is still there


class _ClientGone(Exception):
    pass


def create_app(loop: EngineLoop, model_name: str, api_key: str | None = None, limits: Limits = Limits(),
               metrics_open: bool = False) -> FastAPI:
    """The HTTP API over ``loop``. With ``api_key``, every route but /health and the page's HTML
    needs it (``metrics_open`` leaves /metrics open for a scraper)."""
    engine = loop.engine
    tokenizer = engine.tokenizer
    metrics = Metrics(lambda: loop.last_stats)
    loop.on_finished = metrics.observe
    started = int(time.time())
    # Tokenizing and chat templates run here, never on the event loop, so a huge prompt cannot
    # hold up /health or other clients.
    text_work = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvcache-text")
    if limits.max_prompt_chars is None:  # what the context could hold at a generous 32 characters a token
        limits = replace(limits, max_prompt_chars=32 * engine.max_model_len)
    open_paths = OPEN_PATHS + (("/metrics",) if metrics_open else ())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop.start()
        yield
        loop.stop()
        engine.close()  # offload tiers: pending stores written, threads and connections released
        text_work.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kvcache", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    if api_key:
        app.add_middleware(RequireKey, api_key=api_key, open_paths=open_paths)
    app.add_middleware(CatchAll)  # added last: the outermost of the two

    async def read_body(request: Request) -> bytes:
        limit = limits.max_body_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise APIError(413, f"The request body is larger than {limit} bytes.")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise APIError(413, f"The request body is larger than {limit} bytes.")
                    chunks.append(chunk)
        except TimeoutError:
            raise APIError(408, f"The request body did not arrive within {BODY_TIMEOUT:.0f} s.") from None
        except ClientDisconnect:
            raise _ClientGone() from None
        return b"".join(chunks)

    async def off_loop(fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(text_work, fn, *args)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'.",
                           "model", "model_not_found")

    def choose_max_tokens(prompt_len: int, n: int, wanted: int | None, default: int | None = None,
                          param: str = "prompt") -> int:
        """``wanted`` or, when the client gave none, ``default`` capped by what the context and the
        pool can serve to ``n`` samples (all of it when there is no default)."""
        room = engine.max_new_tokens(prompt_len, n)
        if room < 1:
            raise APIError(400, f"The prompt has {prompt_len} tokens, which leaves no room for a completion: "
                                f"this server's context length is {engine.max_model_len} tokens and its KV "
                                f"cache holds {engine.pool.num_blocks * engine.cache_config.block_size}.",
                           param, "context_length_exceeded")
        if wanted is not None:
            return wanted
        return min(default, room) if default else room

    def sampling(req, max_tokens: int, logprobs: int | None, prompt_len: int) -> SamplingParams:
        """The engine's parameters; a stream receives only what is new each step, a whole
        response only the last output."""
        if prompt_len + max_tokens > engine.max_model_len:
            raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens; "
                                f"you asked for {prompt_len + max_tokens} ({prompt_len} in the prompt, "
                                f"{max_tokens} for the completion). Shorten the prompt or lower max_tokens.",
                           "max_tokens", "context_length_exceeded")
        try:
            return SamplingParams(n=req.n, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos,
                                  logprobs=logprobs, cache_salt=req.cache_salt,
                                  output_kind="delta" if req.stream else "final",
                                  kv_policy=req.kv_policy, kv_budget=req.kv_budget)
        except ValueError as err:  # SamplingParams' messages start with the field's name
            field_name = str(err).split(" ", 1)[0]
            raise APIError(400, str(err), field_name if field_name in SamplingParams.__dataclass_fields__
                           else None) from None

    async def submit(request_id: str, ids: list[int], params: SamplingParams):
        try:
            return await loop.add(request_id, ids, params)
        except ValueError as err:
            raise APIError(400, str(err)) from None

    async def final_output(outputs: asyncio.Queue, request: Request, request_id: str) -> RequestOutput:
        """The request's last output; aborts it within DISCONNECT_POLL of its client leaving, however
        fast tokens arrive."""
        async def last() -> RequestOutput | Exception:
            while True:
                out = await outputs.get()
                if isinstance(out, Exception) or out.finished:
                    return out

        async def client_left() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL)

        waiters = [asyncio.ensure_future(last()), asyncio.ensure_future(client_left())]
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if waiters[0] not in done:
            loop.abort(request_id)
            raise _ClientGone()
        out = waiters[0].result()
        if isinstance(out, Exception) or out.error:
            raise APIError(500, engine_failure(out), type_="server_error")
        return out

    def engine_failure(out: RequestOutput | Exception) -> str:
        return out.error if isinstance(out, RequestOutput) and out.error else "The engine failed on this request."

    @app.exception_handler(_ClientGone)
    async def client_gone(_: Request, __: _ClientGone) -> Response:
        return Response(status_code=499)

    # --- routes ----------------------------------------------------------------------------------

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        problem = loop.health()
        if problem:
            return JSONResponse(APIError(503, f"Unhealthy: {problem}.", type_="server_error").body()
                                | {"status": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ok"})

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
        limits.check(req, len(prompt))
        ids = await off_loop(tokenizer.encode, prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "The prompt is empty.", "prompt")
        params = sampling(req, choose_max_tokens(len(ids), req.n, req.max_tokens, default=16), req.logprobs, len(ids))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = await submit(request_id, ids, params)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(event_stream(outputs, request_id, "text_completion", include_usage,
                                                  completion_choices(req.logprobs)), media_type="text/event-stream")
        out = await final_output(outputs, request, request_id)

        def choices_of(out: RequestOutput) -> list[dict]:  # decodes every logprob token: off the loop
            return [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                     "logprobs": completion_logprobs(tokenizer, c.logprobs) if req.logprobs is not None else None}
                    for c in out.outputs]
        choices = await off_loop(choices_of, out)
        return base("text_completion", request_id, model_name) | {"choices": choices, "usage": usage(out)}

    async def event_stream(outputs: asyncio.Queue, request_id: str, kind: str, include_usage: bool,
                           choices_for: Callable[[StreamState, RequestOutput], Iterator[dict]]) -> AsyncIterator[str]:
        """Server-sent events for one request; aborts it if the client goes away before the end."""
        final, created = None, int(time.time())
        state = StreamState()
        try:
            while True:
                out = await outputs.get()
                if isinstance(out, Exception) or out.error:
                    yield sse(APIError(500, engine_failure(out), type_="server_error").body())
                    break
                for choice in choices_for(state, out):
                    yield sse(base(kind, request_id, model_name, created) | {"choices": [choice]})
                if out.finished:
                    final = out
                    break
            if final is not None and include_usage:
                yield sse(base(kind, request_id, model_name, created) | {"choices": [], "usage": usage(final)})
            yield "data: [DONE]\n\n"
        except Exception:  # headers are sent: the error can only travel as an event
            log.exception("stream of %s failed", request_id)
            yield sse(APIError(500, "The server failed on this request; it has been logged.",
                               type_="server_error").body())
        finally:
            if final is None:
                loop.abort(request_id)

    def completion_choices(logprobs: int | None) -> Callable[[StreamState, RequestOutput], Iterator[dict]]:
        def choices(state: StreamState, out: RequestOutput) -> Iterator[dict]:
            for c in stream_deltas(state, out):
                lp = completion_logprobs(tokenizer, c.logprobs) if logprobs is not None else None
                yield {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}
        return choices

    def chat_choices(logprobs: bool) -> Callable[[StreamState, RequestOutput], Iterator[dict]]:
        def choices(state: StreamState, out: RequestOutput) -> Iterator[dict]:
            for c in stream_deltas(state, out):
                delta: dict[str, Any] = {"content": c.text} if c.text else {}
                if not state.started[c.index]:
                    delta = {"role": "assistant", "content": c.text}
                    state.started[c.index] = True
                if delta:
                    lp = chat_logprobs(tokenizer, c.logprobs) if logprobs else None
                    yield {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": None}
                if c.finish_reason:
                    yield {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}
        return choices

    def render_chat(messages: list[dict[str, str]]) -> list[int]:
        try:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as err:
            raise APIError(400, str(err), "messages") from None
        return tokenizer.encode(prompt, add_special_tokens=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_body(await read_body(request), ChatCompletionRequest)
        check_model(req.model)
        req.check_unsupported()
        if len(req.messages) > limits.max_messages:
            raise APIError(400, f"At most {limits.max_messages} messages per request; got {len(req.messages)}.",
                           "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        limits.check(req, sum(len(m["content"]) for m in messages))
        ids = await off_loop(render_chat, messages)
        max_tokens = choose_max_tokens(len(ids), req.n, req.max_completion_tokens or req.max_tokens,
                                       param="messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling(req, max_tokens, top, len(ids))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = await submit(request_id, ids, params)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(event_stream(outputs, request_id, "chat.completion.chunk", include_usage,
                                                  chat_choices(top is not None)), media_type="text/event-stream")
        out = await final_output(outputs, request, request_id)

        def choices_of(out: RequestOutput) -> list[dict]:  # decodes every logprob token: off the loop
            return [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                     "logprobs": chat_logprobs(tokenizer, c.logprobs) if top is not None else None,
                     "finish_reason": c.finish_reason} for c in out.outputs]
        choices = await off_loop(choices_of, out)
        return base("chat.completion", request_id, model_name) | {"choices": choices, "usage": usage(out)}

    return app

