"""The HTTP API's request bodies (pydantic) and OpenAI's error body, as vLLM's `entrypoints/openai/protocol`."""

from __future__ import annotations

from typing import Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingBody(BaseModel):
    """Fields that completions and chat share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionBody(SamplingBody):
    prompt: Union[str, list[int], list[str], list[list[int]]]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)


class AdapterBody(BaseModel):
    name: str
    path: str


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
