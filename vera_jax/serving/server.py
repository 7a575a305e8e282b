"""An OpenAI-compatible HTTP server over the engine (FastAPI), as vLLM's multi-LoRA server is:
`model` names the adapter ("base" for none).

    GET  /health                     engine and bank state
    GET  /v1/models                  the base and every adapter
    POST /v1/completions             prompt: text, token ids, or a list of either (one choice each)
    POST /v1/chat/completions        messages through the tokenizer's chat template
    POST /v1/adapters                {"name", "path"}: load (checked fully before it is visible)
    DELETE /v1/adapters/{name}       unload (requests in flight finish on it)

Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}: an unknown model is
404 listing the known ones; a prompt that does not fit the context is 400 with both lengths;
malformed JSON is 400 and a bad field 422, naming the field; an adapter that does not fit is
refused with 400 and the reason. Each choice also carries `token_ids` (an extension, as vLLM's
`return_token_ids`). No streaming: `stream: true` is refused with 400.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Union

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from vera_jax.serving.bank import BASE, AdapterBank
from vera_jax.serving.engine import Engine, Request, RequestError


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False


class CompletionBody(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class AdapterBody(BaseModel):
    name: str
    path: str


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": status}})


def create_app(engine: Engine, bank: AdapterBank, *, default_max_tokens: int = 16) -> FastAPI:
    """The FastAPI app; starts the engine's loop on startup and stops it on shutdown."""
    tokenizer = engine.tokenizer

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="vera_jax serving", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return _error(400, f"body: malformed JSON ({first.get('msg')})", "body", "invalid_request_error")
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{field or 'body'}: {first.get('msg')}", field or "body", "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error")

    def check_model(name: str) -> None:
        if name != BASE and name not in bank.names():
            raise APIError(404, bank.unknown(name), "model", "not_found_error")

    def requests_for(body: _Sampling, prompts: list[list[int]]) -> list[Request]:
        if body.stream:
            raise APIError(400, "stream: streaming is not supported; send stream=false", "stream")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if stop and tokenizer is None:
            raise APIError(400, "stop: stop strings need the checkpoint's tokenizer", "stop")
        out = []
        for ids in prompts:
            max_tokens = body.max_tokens or min(default_max_tokens, max(engine.max_length - len(ids), 1))
            out.append(Request(ids, body.model, max_tokens, body.temperature, body.top_p, body.seed, stop))
        return out

    async def run(requests: list[Request]):
        try:
            futures = [engine.submit(r) for r in requests]
        except KeyError as e:
            raise APIError(404, str(e.args[0]), "model", "not_found_error") from None
        except RequestError as e:
            raise APIError(400, str(e), str(e).split(":")[0]) from None
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))

    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "prompt: text needs the checkpoint's tokenizer; send token ids", "prompt")
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])

    def usage(done) -> dict:
        prompt = sum(c.prompt_tokens for c in done)
        completion = sum(len(c.token_ids) for c in done)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @app.get("/health")
    async def health():
        return {"status": "ok", "engine": engine.stats(), "adapters": len(bank.names())}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": BASE, "object": "model", "created": now, "owned_by": "vera_jax", "root": BASE, "parent": None}]
        for name in bank.names():
            info = bank.info(name)
            data.append({"id": name, "object": "model", "created": now, "owned_by": "vera_jax", "root": info.source,
                         "parent": BASE, "group": info.group[:12], "r": info.r, "bytes": info.bytes})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        check_model(body.model)
        p = body.prompt
        if isinstance(p, str):
            prompts = [encode(p)]
        elif p and isinstance(p[0], str):
            prompts = [encode(s) for s in p]
        elif p and isinstance(p[0], list):
            prompts = [list(x) for x in p]
        else:
            prompts = [list(p)]
        done = await run(requests_for(body, prompts))
        choices = [{"index": i, "text": c.text or "", "finish_reason": c.finish_reason, "logprobs": None,
                    "token_ids": c.token_ids} for i, c in enumerate(done)]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "choices": choices, "usage": usage(done)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        check_model(body.model)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "messages: the checkpoint's tokenizer has no chat template; use /v1/completions",
                           "messages")
        messages = [m.model_dump() for m in body.messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        done = await run(requests_for(body, [ids]))
        choices = [{"index": 0, "message": {"role": "assistant", "content": done[0].text or ""},
                    "finish_reason": done[0].finish_reason, "logprobs": None, "token_ids": done[0].token_ids}]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "choices": choices, "usage": usage(done)}

    @app.post("/v1/adapters")
    async def load(body: AdapterBody):
        try:
            info = await run_in_threadpool(bank.load, body.name, body.path)
        except (ValueError, OSError) as e:       # AdapterRefused, AdapterFileError, PeftFormatError
            param = "name" if str(e).startswith("name:") else "path"
            raise APIError(400, f"adapter {body.name!r} refused: {e}", param) from None
        return {"object": "adapter", **info.to_dict()}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        try:
            bank.unload(name)
        except KeyError as e:
            raise APIError(404, str(e.args[0]), "name", "not_found_error") from None
        return {"object": "adapter", "name": name, "deleted": True}

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **uvicorn_kwargs: Any) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, **uvicorn_kwargs)
