"""API-key check as a plain ASGI middleware.

Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``) wraps ``receive`` in a task group,
which makes ``Request.is_disconnected()`` always answer False downstream; a plain ASGI middleware
leaves ``receive`` alone, so abandoned requests are still noticed.
"""

from __future__ import annotations

import secrets
from typing import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from kvcache.server.protocol import APIError


class RequireKey:
    """Answer 401 to any HTTP request without ``Authorization: Bearer KEY``, except on ``open_paths``."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Iterable[str]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not secrets.compare_digest(given, self.expected):
                err = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                               code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)
