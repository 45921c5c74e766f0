"""One engine loop for all clients: a thread owns the LLMEngine; HTTP handlers talk to it by messages.

Handlers never touch the engine. They send commands (add, abort, look) through a queue; the loop
runs them between steps, so every command sees the engine in a consistent state, then steps while
any request is unfinished and hands each output to its request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from kvcache.config import SamplingParams
from kvcache.engine.engine import LLMEngine, RequestOutput

HISTORY_POINTS = 600
STUCK_AFTER = 60.0  # seconds one step or command may take before /health calls the loop stuck
log = logging.getLogger("kvcache.server")


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue


@dataclass
class History:
    """KV usage and queue lengths over time, sampled after steps (at most every 0.25 s)."""

    points: list[tuple[float, float, int, int]] = field(default_factory=list)
    last: float = 0.0

    def record(self, stats: dict[str, Any]) -> None:
        now = time.time()
        if now - self.last < 0.25:
            return
        self.last = now
        self.points.append((now, stats["kv_cache_usage"], stats["num_requests_running"],
                            stats["num_requests_waiting"]))
        del self.points[:-HISTORY_POINTS]


class EngineLoop:
    def __init__(self, engine: LLMEngine, on_finished: Callable[[RequestOutput], None] | None = None,
                 stuck_after: float = STUCK_AFTER) -> None:
        self.engine = engine
        self.stuck_after = stuck_after
        self.on_finished = on_finished
        self.history = History()
        self._commands: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._subscribers: dict[str, _Subscriber] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvcache-engine", daemon=True)
        self.last_stats: dict[str, Any] = engine.stats()
        self._beat = time.monotonic()  # last time the loop came round; read by health()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._commands.put((lambda: None, Future()))
        self._thread.join(timeout=10)

    # --- called from HTTP handlers (any thread) ----------------------------------------------

    def health(self) -> str | None:
        """None when the loop is alive and coming round; otherwise why it is not."""
        if not self._thread.is_alive():
            return "the engine loop has stopped"
        stalled = time.monotonic() - self._beat
        if stalled > self.stuck_after:
            return f"the engine loop has not come round for {stalled:.0f} s"
        return None

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between steps; its result (or exception) in a future."""
        future: Future = Future()
        self._commands.put((fn, future))
        return future

    async def add(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> asyncio.Queue:
        """Queue a request; returns the asyncio queue its outputs arrive on. Raises ValueError."""
        subscriber = _Subscriber(asyncio.get_running_loop(), asyncio.Queue())

        def add() -> None:
            self.engine.add_request(request_id, prompt, params)
            self._subscribers[request_id] = subscriber
        await asyncio.wrap_future(self.call(add))
        return subscriber.outputs

    def abort(self, request_id: str) -> None:
        def abort() -> None:
            self._subscribers.pop(request_id, None)
            self.engine.abort(request_id)
        self.call(abort)

    # --- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._beat = time.monotonic()
            busy = self.engine.has_unfinished_requests()
            if self._run_commands(block=not busy) or not busy:
                self.last_stats = self.engine.stats()  # aborts change the pool between steps
                self.history.record(self.last_stats)
            if self.engine.has_unfinished_requests():
                self._step()

    def _run_commands(self, block: bool) -> bool:
        """Run every queued command (waiting up to 0.5 s for one if ``block``); True if any ran."""
        try:
            fn, future = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return False
        while True:
            try:
                future.set_result(fn())
            except Exception as err:  # the handler that asked decides what the error means
                future.set_exception(err)
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:  # a bug must not take the server down: end what was running, go on
            log.exception("an engine step failed; ending the requests in flight")
            self._fail_all(err)
            return
        for out in outputs:
            subscriber = self._subscribers.get(out.request_id)
            if out.finished:
                self._subscribers.pop(out.request_id, None)
                if self.on_finished:
                    self.on_finished(out)
            if subscriber:
                subscriber.loop.call_soon_threadsafe(subscriber.outputs.put_nowait, out)
        self.last_stats = self.engine.stats()
        self.history.record(self.last_stats)

    def _fail_all(self, err: Exception) -> None:
        """End every request in the engine, with a client or not, so that no orphan is left."""
        for request_id in self.engine.abort_all(f"{type(err).__name__}: {err}"):
            subscriber = self._subscribers.pop(request_id, None)
            if subscriber:
                subscriber.loop.call_soon_threadsafe(subscriber.outputs.put_nowait, err)
        self.last_stats = self.engine.stats()
