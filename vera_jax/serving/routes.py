"""The routes of the OpenAI-compatible HTTP server over the engine (FastAPI), as vLLM's multi-LoRA server is:
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
`return_token_ids`).

Streaming (`stream: true`) answers `text/event-stream` as OpenAI and vLLM do: `data: {chunk}` events
(`text_completion` chunks with `choices[i].text` deltas, or `chat.completion.chunk` with
`choices[0].delta`, the first carrying the role), a chunk with each choice's `finish_reason`, a
`usage` chunk when `stream_options.include_usage`, then `data: [DONE]`. Every error that the
unstreamed request would get (404, 400, 422) comes before the stream starts, as JSON. The engine
hands each token over as it is sampled (`Engine.submit(on_token=...)`); `TextStream` turns the
tokens into text deltas whose concatenation is exactly the unstreamed text. A client that goes away
cancels its requests, which frees their slots.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError

from vera_jax.serving.bank import BASE, AdapterBank
from vera_jax.serving.engine import Engine, Request, RequestError
from vera_jax.serving.protocol import (
    AdapterBody,
    APIError,
    ChatBody,
    CompletionBody,
    SamplingBody,
    error_response,
    usage_of,
)
from vera_jax.serving.streaming import stream_response


def create_app(engine: Engine, bank: AdapterBank, *, default_max_tokens: int = 16) -> FastAPI:
    """The FastAPI app; starts the engine's loop on startup and stops it on shutdown."""
    tokenizer = engine.tokenizer

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="vera_jax serving", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def apierror_response(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def validationerror_response(_, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, f"body: malformed JSON ({first.get('msg')})", "body", "invalid_request_error")
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, f"{field or 'body'}: {first.get('msg')}", field or "body", "invalid_request_error")

    @app.exception_handler(Exception)
    async def internalerror_response(_, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error")

    def check_model(name: str) -> None:
        if name != BASE and name not in bank.names():
            raise APIError(404, bank.unknown(name), "model", "not_found_error")

    def requests_for(body: SamplingBody, prompts: list[list[int]]) -> list[Request]:
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options: only allowed with stream=true", "stream_options")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if stop and tokenizer is None:
            raise APIError(400, "stop: stop strings need the checkpoint's tokenizer", "stop")
        out = []
        for ids in prompts:
            max_tokens = body.max_tokens or min(default_max_tokens, max(engine.max_length - len(ids), 1))
            out.append(Request(ids, body.model, max_tokens, body.temperature, body.top_p, body.seed, stop))
        return out

    def submit(requests: list[Request], on_token=None) -> list[concurrent.futures.Future]:
        """Queues every request or none: all are checked first, so a bad one is refused before any runs."""
        try:
            for r in requests:
                engine.check(r)
            return [engine.submit(r, None if on_token is None else on_token(i)) for i, r in enumerate(requests)]
        except KeyError as e:
            raise APIError(404, str(e.args[0]), "model", "not_found_error") from None
        except RequestError as e:
            raise APIError(400, str(e), str(e).split(":")[0]) from None

    async def run(requests: list[Request]):
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in submit(requests)))

    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "prompt: text needs the checkpoint's tokenizer; send token ids", "prompt")
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])

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
        requests = requests_for(body, prompts)
        if body.stream:
            def chunk(i, text, ids, finish):
                if text is None:                             # no opening chunk: a completion has no role
                    return None
                return {"index": i, "text": text, "logprobs": None, "finish_reason": finish, "token_ids": ids}
            return stream_response(engine, body, requests, submit, chunk)
        done = await run(requests)
        choices = [{"index": i, "text": c.text or "", "finish_reason": c.finish_reason, "logprobs": None,
                    "token_ids": c.token_ids} for i, c in enumerate(done)]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "choices": choices, "usage": usage_of(done)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        check_model(body.model)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "messages: the checkpoint's tokenizer has no chat template; use /v1/completions",
                           "messages")
        messages = [m.model_dump() for m in body.messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        requests = requests_for(body, [ids])
        if body.stream:
            def chunk(i, text, ids, finish):
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish, "token_ids": ids}
            return stream_response(engine, body, requests, submit, chunk)
        done = await run(requests)
        choices = [{"index": 0, "message": {"role": "assistant", "content": done[0].text or ""},
                    "finish_reason": done[0].finish_reason, "logprobs": None, "token_ids": done[0].token_ids}]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "choices": choices, "usage": usage_of(done)}

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
