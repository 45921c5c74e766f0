"""Building OpenAI response objects (whole and streamed) from engine outputs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from kvcache.engine.engine import RequestOutput
from kvcache.models.tokenizer import Tokenizer


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(out: RequestOutput) -> dict[str, Any]:
    completion = sum(len(c.token_ids) for c in out.outputs)
    prompt = len(out.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "kv_cache_peak_bytes": out.metrics.get("peak_kv_bytes", 0),
            "prompt_tokens_details": {"cached_tokens": out.metrics.get("num_cached_prompt_tokens", 0)}}


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer: Tokenizer, entries: list[dict], start: int = 0,
                        text_offset: int = 0) -> dict[str, Any]:
    """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets, offset = [], [], text_offset
    for e in entries[start:]:
        text = _token_text(tokenizer, e["token_id"])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries[start:]],
            "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in e["top"]} for e in entries[start:]],
            "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, entries: list[dict], start: int = 0) -> dict[str, Any]:
    """The chat format: content = [{token, logprob, bytes, top_logprobs: [...]}]."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [item(e["token_id"], e["logprob"]) | {"top_logprobs": [item(t, lp) for t, lp in e["top"]]}
                        for e in entries[start:]]}


@dataclass
class StreamState:
    """What each choice has already been sent, so every chunk carries only what is new."""

    text_sent: list[int] = field(default_factory=list)
    tokens_sent: list[int] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    started: list[bool] = field(default_factory=list)

    def widen(self, n: int) -> None:
        """Track ``n`` choices (the n samples fork off the first one after its prefill)."""
        while len(self.text_sent) < n:
            self.text_sent.append(0)
            self.tokens_sent.append(0)
            self.finished.append(False)
            self.started.append(False)


def stream_deltas(state: StreamState, out: RequestOutput) -> list[tuple[int, str, int, str | None]]:
    """(index, new text, first new token position, finish_reason) for choices that moved."""
    deltas = []
    for c in out.outputs:
        i = c.index
        if state.finished[i]:
            continue
        done = c.finish_reason is not None
        visible = c.text if done else c.text.rstrip("\ufffd")  # hold back half a character
        new_text = visible[state.text_sent[i]:]
        first_token = state.tokens_sent[i]
        if new_text or done or len(c.token_ids) > first_token:
            deltas.append((i, new_text, first_token, c.finish_reason if done else None))
            state.text_sent[i] = max(state.text_sent[i], len(visible))
            state.tokens_sent[i] = len(c.token_ids)
            state.finished[i] = done
    return deltas


def base(kind: str, request_id: str, model: str, created: int | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": created or int(time.time()), "model": model}
