"""The server's two middlewares, as plain ASGI: the API-key check and the catch-all for errors.

Plain ASGI because Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``) wraps
``receive`` in a task group, which makes ``Request.is_disconnected()`` always answer False
downstream, and because Starlette's own handler for ``Exception`` re-raises after answering (so
every unexpected error would be logged twice).
"""

from __future__ import annotations

import logging
import secrets
from typing import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvcache.server.errors import APIError


class RequireKey:
    """Answer 401 to any HTTP request without ``Authorization: Bearer KEY``, except on ``open_paths``."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Iterable[str]) -> None:
        self.app = app
        self.key = api_key.encode()
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, key = given.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(key, self.key):
                err = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                               code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


log = logging.getLogger("kvcache.server")


class CatchAll:
    """Any exception that escapes a route becomes one log line with its traceback and, if no
    response has started, an OpenAI error object: a 400 for text that cannot be read (encoding,
    nesting), a 500 otherwise. Never a traceback to the client."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, send_tracked)
        except (RecursionError, UnicodeError):
            if not started:
                err = APIError(400, "The request could not be read as text (bad encoding or nesting).")
                await JSONResponse(err.body(), status_code=400)(scope, receive, send)
        except Exception as exc:
            log.error("unexpected %s on %s %s", type(exc).__name__, scope["method"], scope["path"], exc_info=exc)
            if not started:
                err = APIError(500, "The server failed on this request; it has been logged.", type_="server_error")
                await JSONResponse(err.body(), status_code=500)(scope, receive, send)
