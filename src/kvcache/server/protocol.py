"""The OpenAI wire format: request schemas (pydantic) and error objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 16


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

    def check(self, req: "_Common", prompt_chars: int) -> None:
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


class APIError(Exception):
    """An error a client caused or must know about, sent as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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
