"""The routes of the OpenAI-compatible HTTP server over the engine (FastAPI), as vLLM's multi-LoRA server is:
`model` names the adapter ("base" for none).

    GET  /health                     engine and bank state (never needs the key)
    GET  /metrics                    Prometheus metrics (metrics.py)
    GET  /v1/models                  the base and every adapter
    POST /v1/completions             prompt: text, token ids, or a list of either (one choice each)
    POST /v1/chat/completions        messages through the tokenizer's chat template
    POST /v1/adapters                {"name", "path"}: load from inside the adapter root (checked fully
                                     before it is visible); off unless the app has an adapter root
    DELETE /v1/adapters/{name}       unload: queued requests bound to it end with 404, running ones finish
    POST /v1/load_lora_adapter       vLLM's aliases: {"lora_name", "lora_path"} / {"lora_name"}
    POST /v1/unload_lora_adapter

With an API key, every /v1 route needs `Authorization: Bearer KEY` (401 otherwise), as vLLM's
`--api-key`. A request is bound when admitted to the adapter version it named: an unload or a
reload under the same name never changes what it runs on (engine.py).

Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}, every one of them: an
unknown model is 404 listing the known ones; a prompt that does not fit the context is 400 with
both lengths; malformed JSON, text that is not valid Unicode, an unsupported OpenAI parameter and
a request over the limits (prompt characters, prompts per request) are 400; a body over the limit
413; a bad field 422, naming the field; an adapter that does not fit is refused with 400 and the
reason. A client that goes away cancels its requests, streamed or not. Each choice also carries
`token_ids` (an extension, as vLLM's `return_token_ids`).

Logprobs (logprobs.py): completions take `logprobs` (0-5) and `echo` (the prompt first; with
`logprobs`, its tokens' logprobs too, the first null; `max_tokens: 0` then scores the prompt
only) in OpenAI's legacy format; chat takes `logprobs: true` and `top_logprobs` (0-20) in the chat
format. Values are log-softmax of the raw logits (before temperature/top-p). Not with `stream`.

Streaming (`stream: true`) answers `text/event-stream` as OpenAI and vLLM do: `data: {chunk}` events
(`text_completion` chunks with `choices[i].text` deltas, or `chat.completion.chunk` with
`choices[0].delta`, the first carrying the role), a chunk with each choice's `finish_reason`, a
`usage` chunk when `stream_options.include_usage`, then `data: [DONE]`. Every error that the
unstreamed request would get (404, 400, 422) comes before the stream starts, as JSON. The engine
hands each token over as it is sampled (`Engine.submit(on_token=...)`); `TextStream` turns the
tokens into text deltas whose concatenation is exactly the unstreamed text. An error that comes
after the stream started (the adapter unloaded while the request was queued: 404) is one `error`
event with that code, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import time
import uuid
from pathlib import Path

from vera_jax.extras import missing

try:
    from fastapi import APIRouter, Depends, FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import PlainTextResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from prometheus_client import CollectorRegistry  # noqa: F401 - metrics.py's, checked here with the rest
    from starlette.exceptions import HTTPException
except ModuleNotFoundError as e:
    raise missing("serving", e) from e

from vera_jax.serving import logprobs
from vera_jax.serving.bank import BASE, AdapterBank
from vera_jax.serving.engine import Engine, Request, RequestError
from vera_jax.serving.metrics import CLIENT_GONE, Guard, Metrics
from vera_jax.serving.protocol import (
    ERROR_RESPONSES,
    STREAM_RESPONSE,
    TEXT_RESPONSE,
    AdapterBody,
    APIError,
    ChatBody,
    CompletionBody,
    LoraLoadBody,
    LoraUnloadBody,
    SamplingBody,
    error_response,
    failure,
    usage_of,
)
from vera_jax.serving.streaming import stream_response

MAX_BODY_BYTES = 4 * 2**20
MAX_PROMPT_CHARS = 1_000_000
MAX_PROMPTS = 16
DISCONNECT_POLL_S = 0.25


def create_app(engine: Engine, bank: AdapterBank, *, default_max_tokens: int = 16, api_key: str | None = None,
               adapter_root: str | os.PathLike | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               max_prompt_chars: int = MAX_PROMPT_CHARS, max_prompts: int = MAX_PROMPTS) -> FastAPI:
    """The FastAPI app; starts the engine's loop on startup and stops it on shutdown.

    api_key: required as `Authorization: Bearer KEY` on every /v1 route (None: open).
    adapter_root: the only directory under which run-time loads may read (None: run-time loading off).
    max_body_bytes / max_prompt_chars / max_prompts: a request's body size (413), its prompt text
    in characters before tokenizing, and its number of prompts (400 beyond either).
    """
    tokenizer = engine.tokenizer
    root = None if adapter_root is None else Path(adapter_root).resolve()
    metrics = Metrics(engine, bank)

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="vera_jax serving", lifespan=lifespan)
    app.add_middleware(Guard, max_body_bytes=max_body_bytes, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        response = error_response(exc.status_code, str(exc.detail), None, kind)
        response.headers.update(exc.headers or {})             # e.g. 405's Allow
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        errors = exc.errors()
        first = next((e for e in errors if e.get("type") in ("json_invalid", "invalid_text")), errors[0])
        if first.get("type") == "json_invalid":
            return error_response(400, f"body: malformed JSON ({first.get('msg')})", "body", "invalid_request_error")
        # union branches add tags such as "list[int]" or "function-after[...]" to the location: not fields
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not (isinstance(p, str) and "[" in p)]
        field = ".".join(loc) or "body"
        status = 400 if first.get("type") == "invalid_text" else 422
        return error_response(status, f"{field}: {first.get('msg')}", loc[0] if loc else "body",
                              "invalid_request_error")

    bearer = HTTPBearer(auto_error=False, description="the server's --api-key")

    async def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        given = "" if credentials is None else credentials.credentials
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "a valid API key is required: Authorization: Bearer KEY", None,
                           "authentication_error")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)] if api_key else [], responses=ERROR_RESPONSES)

    def check_model(name: str, http: HTTPRequest) -> None:
        if name != BASE and name not in bank.names():
            raise APIError(404, bank.unknown(name), "model", "not_found_error")
        http.state.adapter = name

    def requests_for(body: SamplingBody, prompts: list[list[int]]) -> list[Request]:
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options: only allowed with stream=true", "stream_options")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if stop and tokenizer is None:
            raise APIError(400, "stop: stop strings need the checkpoint's tokenizer", "stop")
        if isinstance(body, ChatBody):
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            prompt_logprobs = None
        else:
            logprobs = body.logprobs
            prompt_logprobs = (logprobs if logprobs is not None else 0 if body.max_tokens == 0 else None
                               ) if body.echo else None
        out = []
        for ids in prompts:
            max_tokens = body.max_tokens
            if max_tokens is None:
                max_tokens = min(default_max_tokens, max(engine.max_length - len(ids), 1))
            out.append(Request(ids, body.model, max_tokens, body.temperature, body.top_p, body.seed, stop,
                               logprobs, prompt_logprobs))
        return out

    def check_body(body: SamplingBody, texts: list[str], prompts: int) -> None:
        """Refuses unsupported parameters and requests over the limits, before any tokenizing."""
        problem = body.unsupported()
        if problem is not None:
            raise APIError(400, problem, problem.split(":")[0])
        if prompts > max_prompts:
            raise APIError(400, f"prompt: {prompts} prompts; at most {max_prompts} per request (--max-prompts)",
                           "prompt")
        chars = sum(len(t) for t in texts)
        if chars > max_prompt_chars:
            raise APIError(400, f"prompt: {chars} characters; at most {max_prompt_chars} per request "
                                "(--max-prompt-chars)", "prompt")

    def submit(http: HTTPRequest, requests: list[Request], on_token=None) -> list[concurrent.futures.Future]:
        """Queues every request or none: all are checked first, so a bad one is refused before any runs."""
        futures: list[concurrent.futures.Future] = []
        try:
            for r in requests:
                engine.check(r)
            for i, r in enumerate(requests):
                futures.append(engine.submit(r, timed(None if on_token is None else on_token(i))))
                futures[-1].add_done_callback(lambda f: counted(http, f))
            return futures
        except (KeyError, RequestError) as e:     # (an adapter unloaded meanwhile: none of them runs)
            for f in futures:
                engine.cancel(f)
            if isinstance(e, KeyError):
                raise APIError(404, str(e.args[0]), "model", "not_found_error") from None
            raise APIError(400, str(e), str(e).split(":")[0]) from None

    def timed(on_token):
        """on_token that also observes the time to the first token."""
        start, seen = time.monotonic(), []

        def call(token):
            if not seen:
                seen.append(token)
                metrics.ttft.observe(time.monotonic() - start)
            if on_token is not None:
                on_token(token)
        return call

    def counted(http: HTTPRequest, future: concurrent.futures.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            c = future.result()
            state = http.state
            state.prompt_tokens = getattr(state, "prompt_tokens", 0) + c.prompt_tokens
            state.completion_tokens = getattr(state, "completion_tokens", 0) + len(c.token_ids)

    async def run(http: HTTPRequest, requests: list[Request]):
        """Completions of `requests`; a client that goes away cancels them (its slots free at once)."""
        futures = submit(http, requests)
        waiting = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        try:
            while not (await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S))[0]:
                if await http.is_disconnected():
                    raise APIError(CLIENT_GONE, "the client closed the request", None, "client_closed_request")
            try:
                return waiting.result()
            except (KeyError, asyncio.CancelledError) as e:
                raise failure(e) from None
        finally:
            waiting.cancel()
            for f in futures:
                engine.cancel(f)

    def encode(texts: list[str]) -> list[list[int]]:
        return [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]

    def chat_ids(messages: list[dict]) -> list[int]:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    @app.get("/health", responses={500: ERROR_RESPONSES[500]})
    async def health():
        return {"status": "ok", "engine": engine.stats(), "adapters": len(bank.names())}

    @app.get("/metrics", responses={200: TEXT_RESPONSE, 500: ERROR_RESPONSES[500]})
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @v1.get("/models")
    async def models():
        now = int(time.time())
        data = [{"id": BASE, "object": "model", "created": now, "owned_by": "vera_jax", "root": BASE, "parent": None}]
        for name in bank.names():
            info = bank.info(name)
            data.append({"id": name, "object": "model", "created": now, "owned_by": "vera_jax", "root": name,
                         "parent": BASE, "group": info.group[:12], "r": info.r, "bytes": info.bytes,
                         "version": info.version})
        return {"object": "list", "data": data}

    @v1.post("/completions", responses=STREAM_RESPONSE)
    async def completions(body: CompletionBody, http: HTTPRequest):
        check_model(body.model, http)
        p = body.prompt
        texts = [p] if isinstance(p, str) else [s for s in p if isinstance(s, str)]
        many = bool(p) and isinstance(p, list) and isinstance(p[0], (str, list))
        check_body(body, texts, len(p) if many else 1)
        if texts:
            if tokenizer is None:
                raise APIError(400, "prompt: text needs the checkpoint's tokenizer; send token ids", "prompt")
            prompts = await run_in_threadpool(encode, texts)
        else:
            prompts = [list(x) for x in p] if many else [list(p)]
        requests = requests_for(body, prompts)
        if body.stream:
            def chunk(i, text, ids, finish):
                if text is None:                             # no opening chunk: a completion has no role
                    return None
                return {"index": i, "text": text, "logprobs": None, "finish_reason": finish, "token_ids": ids}
            return stream_response(engine, body, requests, lambda rs, on_token: submit(http, rs, on_token), chunk)
        done = await run(http, requests)
        choices = []
        for i, (c, ids) in enumerate(zip(done, prompts)):
            text = c.text or ""
            if body.echo:
                echoed = texts[i] if texts else "" if tokenizer is None else tokenizer.decode(ids)
                text = echoed + text
            lp = None
            if body.logprobs is not None:
                lp = logprobs.legacy(tokenizer, (ids if body.echo else []) + c.token_ids,
                                     (c.prompt_logprobs if body.echo else []) + c.logprobs)
            choices.append({"index": i, "text": text, "finish_reason": c.finish_reason, "logprobs": lp,
                            "token_ids": c.token_ids})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "choices": choices, "usage": usage_of(done)}

    @v1.post("/chat/completions", responses=STREAM_RESPONSE)
    async def chat(body: ChatBody, http: HTTPRequest):
        check_model(body.model, http)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "messages: the checkpoint's tokenizer has no chat template; use /v1/completions",
                           "messages")
        check_body(body, [m.content for m in body.messages], 1)
        ids = await run_in_threadpool(chat_ids, [m.model_dump() for m in body.messages])
        requests = requests_for(body, [ids])
        if body.stream:
            def chunk(i, text, ids, finish):
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish, "token_ids": ids}
            return stream_response(engine, body, requests, lambda rs, on_token: submit(http, rs, on_token), chunk)
        done = await run(http, requests)
        lp = logprobs.chat(tokenizer, done[0].logprobs) if body.logprobs else None
        choices = [{"index": 0, "message": {"role": "assistant", "content": done[0].text or ""},
                    "finish_reason": done[0].finish_reason, "logprobs": lp, "token_ids": done[0].token_ids}]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "choices": choices, "usage": usage_of(done)}

    def inside_root(path: str) -> Path:
        """The adapter directory `path` names (relative to the root, or absolute) if it lies inside
        the root with everything in it; one message for every other case, so that a client cannot
        tell a missing path from an existing non-adapter one."""
        if root is None:
            raise APIError(403, "adapter loading is off; start the server with --adapter-root DIR", "path",
                           "permission_error")
        refused = APIError(400, f"path: {path!r} is not an adapter directory under the adapter root", "path")
        try:
            directory = (root / path).resolve()
            if not directory.is_relative_to(root) or not (directory / "adapter_config.json").is_file():
                raise refused
            for parent, dirs, files in os.walk(directory):
                if any(not (Path(parent) / n).resolve().is_relative_to(root) for n in dirs + files):
                    raise refused
        except (OSError, ValueError):
            raise refused from None
        return directory

    async def load_adapter(name: str, path: str) -> dict:
        directory = inside_root(path)
        try:
            info = await run_in_threadpool(bank.load, name, directory)
        except (ValueError, OSError) as e:       # AdapterRefused, AdapterFileError, PeftFormatError
            param = "name" if str(e).startswith("name:") else "path"
            raise APIError(400, f"adapter {name!r} refused: {str(e).replace(str(directory), repr(path))}",
                           param) from None
        return {"object": "adapter", **info.to_dict(), "source": path}

    def unload_adapter(name: str) -> None:
        if name == BASE:
            raise APIError(400, "name: the base model cannot be unloaded", "name")
        try:
            engine.unload(name)
        except KeyError as e:
            raise APIError(404, str(e.args[0]), "name", "not_found_error") from None

    @v1.post("/adapters")
    async def load(body: AdapterBody):
        return await load_adapter(body.name, body.path)

    @v1.delete("/adapters/{name}")
    async def unload(name: str):
        unload_adapter(name)
        return {"object": "adapter", "name": name, "deleted": True}

    @v1.post("/load_lora_adapter", responses={200: TEXT_RESPONSE})
    async def load_lora(body: LoraLoadBody):
        """vLLM's route: the same load, vLLM's plain-text answer."""
        await load_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @v1.post("/unload_lora_adapter", responses={200: TEXT_RESPONSE})
    async def unload_lora(body: LoraUnloadBody):
        """vLLM's route: the same unload, vLLM's plain-text answer."""
        unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    app.include_router(v1)
    return app
