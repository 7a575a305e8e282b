"""Server-sent events for streamed completions: text deltas from tokens (`TextStream`) and the
event stream of one request (`stream_response`), as OpenAI and vLLM send them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
import uuid
from typing import Any

from fastapi.responses import StreamingResponse

from vera_jax.serving.engine import Engine, Request
from vera_jax.serving.protocol import ChatBody, SamplingBody, error_body, failure, usage_of


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


def sse(payload) -> str:
    """One server-sent event: a JSON object or a literal string such as `[DONE]`."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def stream_response(engine: Engine, body: SamplingBody, requests: list[Request], submit, chunk) -> StreamingResponse:
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
        texts = [TextStream(engine.tokenizer, r.stop) for r in requests]
        sent_ids = [0] * len(requests)
        done: dict[int, Any] = {}
        try:
            for i in range(len(requests)):
                first = chunk(i, None, [], None)
                if first is not None:
                    yield sse({**head, "choices": [first]})
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
                        if delta or engine.tokenizer is None:
                            choices.append(chunk(i, delta, texts[i].tokens[sent_ids[i]:], None))
                            sent_ids[i] = len(texts[i].tokens)
                        continue
                    f = done[i]
                    error = concurrent.futures.CancelledError() if f.cancelled() else f.exception()
                    if error is not None:                # the engine ended it (it keeps serving the others)
                        e = failure(error)
                        yield sse(error_body(e.status, e.message, e.param, e.kind))
                        yield sse("[DONE]")
                        return
                    c = f.result()
                    delta += texts[i].finish(c.text)
                    choices.append(chunk(i, delta, c.token_ids[sent_ids[i]:], c.finish_reason))
                    sent_ids[i] = len(c.token_ids)
                if choices:
                    yield sse({**head, "choices": choices})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage_of([done[i].result() for i in sorted(done)])})
            yield sse("[DONE]")
        finally:                                         # the client went away (or we are done): free slots
            for f in futures:
                engine.cancel(f)

    return StreamingResponse(events_out(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})
