"""The OpenAI wire format: request schemas (pydantic) and parsing a body into one. The error object
and the per-request limits live in errors.py and limits.py (cheap to import)."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvcache.server.errors import APIError  # noqa: F401 (re-exported)
from kvcache.server.limits import Limits  # noqa: F401 (re-exported)

MAX_N = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    # strict: no silent coercions (true is not n = 1, "5" is not 5); floats still take integers
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    cache_salt: str | None = None
    user: str | None = None
    kv_policy: str | None = None  # extension: full, streaming, h2o or snapkv (default: the server's)
    # extension: KV tokens kept, or a fraction of the sequence; checked by SamplingParams, whose sentence
    # says both forms (a union here would answer "should be a valid integer" to 0.2's mistakes)
    kv_budget: Any = None

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server; leave it at 0.", name)


class CompletionRequest(_Common):
    prompt: Union[str, list[int], list[str]]
    max_tokens: int | None = Field(None, ge=1)  # None: 16, or less where the pool holds less
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def parse_body(raw: bytes, schema: type[BaseModel]) -> Any:
    """Bytes -> a validated request, or an APIError that says what is wrong.

    pydantic parses the JSON itself (in Rust, without building Python objects for fields it
    ignores), so a large or deeply nested body costs little; lone surrogates, nesting past its
    recursion limit and numbers too long to convert are JSON errors there, hence 400s."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "The request body is not valid UTF-8.") from None
    try:
        return schema.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"The request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}."
                           ) from None
        if first["type"] == "model_type" and not first["loc"]:
            raise APIError(400, "The request body must be a JSON object.") from None
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"Invalid value for '{param}': {first['msg']}." if param else first["msg"],
                       param) from None
