"""The HTTP API's request bodies (pydantic) and OpenAI's error body, as vLLM's `entrypoints/openai/protocol`.

Bodies are strict: a float or a bool is not an int, a string is not a bool, and text must be valid
Unicode (JSON can carry a lone surrogate, which no tokenizer takes: `invalid_text`, a 400).
OpenAI parameters that this server does not implement are declared so that a request using them
is refused (`unsupported`) instead of silently served without them; unknown fields are ignored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Annotated, Any, Literal, Union

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt
from pydantic_core import PydanticCustomError

from vera_jax.serving.bank import AdapterUnloaded
from vera_jax.serving.logprobs import MAX_CHAT_TOP_LOGPROBS, MAX_COMPLETION_LOGPROBS


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError("invalid_text", "a lone surrogate at character {at}; text must be valid Unicode",
                                  {"at": e.start}) from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingBody(_Strict):
    """Fields that completions and chat share."""

    model: Text
    max_tokens: StrictInt | None = Field(default=None, ge=0)   # 0 only with echo (`unsupported`)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**32)
    stop: Union[Text, list[Text], None] = None
    n: StrictInt = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI parameters that are refused unless they ask for what is done anyway (see `unsupported`)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None

    def unsupported(self) -> str | None:
        """The first parameter set to something this server does not do, as `param: why`."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                return f"{name}: {getattr(self, name)!r} is not supported; only 0"
        if self.logit_bias:
            return "logit_bias: not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return f"response_format: {self.response_format.get('type')!r} is not supported; only 'text'"
        if self.tools:
            return "tools: tool calls are not supported"
        if self.max_tokens == 0 and not getattr(self, "echo", False):
            return "max_tokens: 0 is allowed only with echo=true (/v1/completions); expected >= 1"
        return None


class CompletionBody(SamplingBody):
    prompt: Union[Text, list[StrictInt], list[Text], list[list[StrictInt]]]
    best_of: StrictInt | None = Field(default=None, ge=1)
    suffix: Text | None = None
    logprobs: StrictInt | None = None   # 0..MAX_COMPLETION_LOGPROBS alternatives per token (legacy format)
    echo: bool = False                  # the prompt (and with logprobs, its tokens' logprobs) comes first

    def unsupported(self) -> str | None:
        if self.best_of not in (None, 1):
            return f"best_of: {self.best_of} is not supported; only 1"
        if self.suffix:
            return "suffix: not supported"
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            return f"logprobs: {self.logprobs}; expected 0 to {MAX_COMPLETION_LOGPROBS} alternatives per token"
        if self.stream and (self.logprobs is not None or self.echo):
            return f"{'logprobs' if self.logprobs is not None else 'echo'}: not available with stream=true"
        return super().unsupported()


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: StrictInt | None = None   # 0..MAX_CHAT_TOP_LOGPROBS, with logprobs=true

    def unsupported(self) -> str | None:
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_CHAT_TOP_LOGPROBS:
                return f"top_logprobs: {self.top_logprobs}; expected 0 to {MAX_CHAT_TOP_LOGPROBS}"
            if not self.logprobs:
                return "top_logprobs: needs logprobs=true"
        if self.stream and self.logprobs:
            return "logprobs: not available with stream=true"
        return super().unsupported()


class AdapterBody(_Strict):
    name: Text
    path: Text


class LoraLoadBody(_Strict):
    """vLLM's `POST /v1/load_lora_adapter` body."""

    lora_name: Text
    lora_path: Text


class LoraUnloadBody(_Strict):
    """vLLM's `POST /v1/unload_lora_adapter` body (`lora_int_id` is accepted and not needed)."""

    lora_name: Text
    lora_int_id: StrictInt | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error body, which every error of this server has (documented in the OpenAPI schema)."""

    error: ErrorDetail


ERROR_RESPONSES: dict = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 422, 500)}
STREAM_RESPONSE: dict = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or events if stream"}}
TEXT_RESPONSE: dict = {"content": {"text/plain": {}}, "description": "text"}


class APIError(Exception):
    """Raised by a route; answered as OpenAI's error body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(status: int, message: str, param: str | None, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param, kind))


def usage_of(done) -> dict:
    """OpenAI's `usage` of finished Completions."""
    prompt = sum(c.prompt_tokens for c in done)
    completion = sum(len(c.token_ids) for c in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def failure(exc: BaseException) -> APIError:
    """The API error of a request that the engine ended with `exc` instead of a Completion."""
    if isinstance(exc, AdapterUnloaded):
        return APIError(404, exc.args[0], "model", "not_found_error")
    if isinstance(exc, (asyncio.CancelledError, concurrent.futures.CancelledError)):
        return APIError(503, "the request was cancelled", None, "server_error")
    return APIError(500, f"internal error ({type(exc).__name__}); see the server log", None, "server_error")
