"""Logprobs in OpenAI's two response formats, from the engine's `TokenLogprob`s.

The values are the engine's: log-softmax of the raw logits (before temperature and top-p), as
vLLM's default. `/v1/completions` uses the legacy format (`logprobs`: 0 to `MAX_COMPLETION_LOGPROBS`
alternatives): `tokens`, `token_logprobs`, `top_logprobs` (per token a {token: logprob} dict of
the k most likely plus the token itself, as OpenAI: up to k + 1 entries) and `text_offset` (where
each token starts in the returned text: where it ends in the decoding of the tokens up to it, less
its own length); with `echo` the prompt's tokens come first, the first of
them with null logprobs. `/v1/chat/completions` uses the chat format (`top_logprobs`: 0 to
`MAX_CHAT_TOP_LOGPROBS`): `{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`.

A token's text is the tokenizer's decoding of that token alone (without a tokenizer,
"token_id:N", as vLLM's `return_tokens_as_token_ids`); `bytes` are its UTF-8 bytes.
"""

from __future__ import annotations

from vera_jax.serving.engine import MAX_TOP_LOGPROBS, TokenLogprob

MAX_COMPLETION_LOGPROBS = 5              # OpenAI's limit for the legacy `logprobs`
MAX_CHAT_TOP_LOGPROBS = MAX_TOP_LOGPROBS  # OpenAI's limit for chat `top_logprobs` (20)


def token_text(tokenizer, token: int) -> str:
    if tokenizer is None:
        return f"token_id:{token}"
    return tokenizer.decode([token], skip_special_tokens=False)


def legacy(tokenizer, token_ids: list[int], entries: list[TokenLogprob | None]) -> dict:
    """The legacy `logprobs` object of `token_ids` (prompt and/or generated), one entry each."""
    texts = [token_text(tokenizer, t) for t in token_ids]
    offsets, at = [], 0
    for i, text in enumerate(texts):
        if tokenizer is not None:       # where the token ends in the decoded prefix, less its own text
            at = max(len(tokenizer.decode(token_ids[: i + 1], skip_special_tokens=False)) - len(text), 0)
        offsets.append(at)
        at += len(text)
    top = []
    for e in entries:
        if e is None:
            top.append(None)
            continue
        alternatives = {token_text(tokenizer, t): v for t, v in e.top}
        alternatives.setdefault(token_text(tokenizer, e.token), e.logprob)
        top.append(alternatives)
    return {"tokens": texts, "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": top, "text_offset": offsets}


def chat(tokenizer, entries: list[TokenLogprob]) -> dict:
    """The chat `logprobs` object of the generated tokens."""
    def one(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]}
                        for e in entries]}
