"""What one request may ask of the server, and its timeouts: plain data, cheap to import (the
command line reads the defaults for its --help without loading the web stack)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvcache.server.errors import APIError

HEADER_TIMEOUT = 10.0  # seconds for a request's headers to arrive, from connection or last response


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; each is a 400 that names the limit when exceeded.

    Stop strings are searched for by every sample at every token, so n x (number of stop strings)
    is bounded as well as the count and length of each."""

    max_body_bytes: int = 4 << 20
    max_prompt_chars: int | None = None  # None: 32 characters for every token of the context
    max_messages: int = 1024
    max_stop: int = 16
    max_stop_chars: int = 256
    max_stop_work: int = 64  # n x number of stop strings

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"The server limit {name} must be a positive integer, got {value!r}.")

    def check(self, req: Any, prompt_chars: int) -> None:
        if prompt_chars > self.max_prompt_chars:
            raise APIError(400, f"The prompt has {prompt_chars} characters; this server takes at most "
                                f"{self.max_prompt_chars} per request.", "prompt", "prompt_too_long")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > self.max_stop:
            raise APIError(400, f"At most {self.max_stop} stop strings per request; got {len(stops)}.", "stop")
        if any(len(s) > self.max_stop_chars for s in stops):
            raise APIError(400, f"Each stop string may have at most {self.max_stop_chars} characters.", "stop")
        if req.n * len(stops) > self.max_stop_work:
            raise APIError(400, f"n x (number of stop strings) may be at most {self.max_stop_work}; "
                                f"got {req.n} x {len(stops)}.", "stop")
