"""Building OpenAI response objects (whole and streamed) from engine outputs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from kvcache.engine.engine import CompletionOutput, RequestOutput
from kvcache.models.tokenizer import Tokenizer


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(out: RequestOutput) -> dict[str, Any]:
    completion = out.metrics["num_output_tokens"]
    prompt = len(out.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "kv_cache_peak_bytes": out.metrics.get("peak_kv_bytes", 0),
            "prompt_tokens_details": {"cached_tokens": out.metrics.get("num_cached_prompt_tokens", 0)}}


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer: Tokenizer, entries: list[dict]) -> dict[str, Any]:
    """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets, offset = [], [], 0
    for e in entries:
        text = _token_text(tokenizer, e["token_id"])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in e["top"]} for e in entries],
            "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, entries: list[dict]) -> dict[str, Any]:
    """The chat format: content = [{token, logprob, bytes, top_logprobs: [...]}]."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [item(e["token_id"], e["logprob"]) | {"top_logprobs": [item(t, lp) for t, lp in e["top"]]}
                        for e in entries]}


@dataclass
class StreamState:
    """Which choices have started (chat sends the role first) and finished."""

    finished: list[bool] = field(default_factory=list)
    started: list[bool] = field(default_factory=list)

    def widen(self, n: int) -> None:
        """Track ``n`` choices (the n samples fork off the first one after its prefill)."""
        while len(self.finished) < n:
            self.finished.append(False)
            self.started.append(False)


def stream_deltas(state: StreamState, out: RequestOutput) -> list[CompletionOutput]:
    """The choices that moved; ``out`` holds deltas (output_kind "delta"), so nothing here grows
    with the length of the stream."""
    state.widen(1 + max((c.index for c in out.outputs), default=-1))
    moved = [c for c in out.outputs if not state.finished[c.index]]
    for c in moved:
        state.finished[c.index] = c.finish_reason is not None
    return moved


def base(kind: str, request_id: str, model: str, created: int | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": created or int(time.time()), "model": model}
