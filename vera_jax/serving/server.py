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
import json
import time
import uuid
from typing import Any, Union

from vera_jax.extras import missing, require

try:
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ModuleNotFoundError as e:
    raise missing("serving", e) from e

from vera_jax.serving.bank import BASE, AdapterBank
from vera_jax.serving.engine import Engine, Request, RequestError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


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
    stream_options: StreamOptions | None = None


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


class TextStream:
    """Text deltas of one generation from its tokens, so that the deltas concatenate to the final text.

    Each step decodes the whole token list so far (a character made of several tokens, or a
    tokenizer that merges pieces, then comes out right) and sends only what extends the text
    already sent, holding back what may still change or must never be sent:
    - a trailing U+FFFD: the start of a multi-byte character whose other bytes are still to come;
    - any suffix that could be the start of a stop string: the stop string would be part of the
      text if its remaining tokens arrive, and a stop string is never returned;
    - everything from a stop string on (the engine ends the request at that token).
    `finish` then sends the rest of the engine's own final text, so the stream equals the
    unstreamed `text` even where the holding back guessed wrong. This needs decoding a longer list
    to only append to the text of a shorter one; a tokenizer that rewrites earlier text (HF's
    `clean_up_tokenization_spaces`, off by default) makes later deltas wait and, where it rewrites
    text already sent, leaves the stream differing from the final text there.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.sent = ""

    def visible(self, text: str) -> str:
        """The longest part of `text` that is safe to send now."""
        hits = [text.index(s) for s in self.stop if s in text]
        if hits:
            text = text[: min(hits)]
        text = text.rstrip("\ufffd")
        for k in range(min(len(text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return text[:-k]
        return text

    def push(self, tokens: list[int]) -> str:
        """Takes new token ids; returns the new text that may be sent (often "")."""
        self.tokens += tokens
        if self.tokenizer is None:
            return ""
        text = self.visible(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self, text: str | None) -> str:
        """The rest of the final text (the engine's, which cut any stop string)."""
        text = text or ""
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta


def _sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


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

    def stream(body: _Sampling, requests: list[Request], chunk) -> StreamingResponse:
        """Submits now (so a refusal is a JSON error) and streams the choices' deltas as they come.

        The engine thread puts (choice, token) and then (choice, future) on one asyncio queue, in
        that order, so every token is seen before its choice finishes. chunk(index, delta text,
        token ids, finish_reason) makes one choice of a chunk; choices interleave as generated.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_token(index):
            return lambda token: loop.call_soon_threadsafe(events.put_nowait, (index, token))

        futures = submit(requests, on_token)
        for i, f in enumerate(futures):
            f.add_done_callback(lambda f, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, f)))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = {"id": f"{'chatcmpl' if isinstance(body, ChatBody) else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk" if isinstance(body, ChatBody) else "text_completion",
                "created": int(time.time()), "model": body.model}
        if include_usage:
            head["usage"] = None

        async def events_out():
            texts = [TextStream(tokenizer, r.stop) for r in requests]
            sent_ids = [0] * len(requests)
            done: dict[int, Any] = {}
            try:
                for i in range(len(requests)):
                    first = chunk(i, None, [], None)
                    if first is not None:
                        yield _sse({**head, "choices": [first]})
                while len(done) < len(requests):
                    batch = [await events.get()]
                    while not events.empty():                # decode once per burst of tokens, not per token
                        batch.append(events.get_nowait())
                    new: dict[int, list[int]] = {}
                    finished = []
                    for i, item in batch:
                        if isinstance(item, concurrent.futures.Future):
                            finished.append(i)
                            done[i] = item
                        else:
                            new.setdefault(i, []).append(item)
                    choices = []
                    for i in sorted(set(new) | set(finished)):   # one entry per choice: clients read choices[0]
                        delta = texts[i].push(new.get(i, []))
                        if i not in finished:
                            if delta or tokenizer is None:
                                choices.append(chunk(i, delta, texts[i].tokens[sent_ids[i]:], None))
                                sent_ids[i] = len(texts[i].tokens)
                            continue
                        f = done[i]
                        error = concurrent.futures.CancelledError() if f.cancelled() else f.exception()
                        if error is not None:                # the engine failed it (it keeps serving the others)
                            yield _sse({"error": {"message": f"internal error: {type(error).__name__}: {error}",
                                                  "type": "server_error", "param": None, "code": 500}})
                            yield _sse("[DONE]")
                            return
                        c = f.result()
                        delta += texts[i].finish(c.text)
                        choices.append(chunk(i, delta, c.token_ids[sent_ids[i]:], c.finish_reason))
                        sent_ids[i] = len(c.token_ids)
                    if choices:
                        yield _sse({**head, "choices": choices})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": usage([done[i].result() for i in sorted(done)])})
                yield _sse("[DONE]")
            finally:                                         # the client went away (or we are done): free slots
                for f in futures:
                    engine.cancel(f)

        return StreamingResponse(events_out(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

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
        requests = requests_for(body, prompts)
        if body.stream:
            def chunk(i, text, ids, finish):
                if text is None:                             # no opening chunk: a completion has no role
                    return None
                return {"index": i, "text": text, "logprobs": None, "finish_reason": finish, "token_ids": ids}
            return stream(body, requests, chunk)
        done = await run(requests)
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
        requests = requests_for(body, [ids])
        if body.stream:
            def chunk(i, text, ids, finish):
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish, "token_ids": ids}
            return stream(body, requests, chunk)
        done = await run(requests)
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
    uvicorn = require("uvicorn", "serving")

    uvicorn.run(app, host=host, port=port, **uvicorn_kwargs)
