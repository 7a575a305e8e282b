"""Serving many VeRA adapters on one base: the adapter bank, the batched per-row forward, the
continuous-batching engine and the OpenAI-compatible HTTP server (`python -m vera_jax.serving`;
the server needs fastapi, uvicorn and prometheus-client, imported only by its modules: `server`,
`routes`, `protocol`, `streaming`, `metrics`, and by `__main__`)."""

from vera_jax.serving.bank import BASE, AdapterBank, AdapterInfo, AdapterRefused, AdapterUnloaded, rows_for
from vera_jax.serving.batched import BankDecoder
from vera_jax.serving.engine import MAX_TOP_LOGPROBS, Completion, Engine, Request, RequestError, TokenLogprob

__all__ = ["BASE", "MAX_TOP_LOGPROBS", "AdapterBank", "AdapterInfo", "AdapterRefused", "AdapterUnloaded", "BankDecoder",
           "Completion", "Engine", "Request", "RequestError", "TokenLogprob", "rows_for"]
