"""Serving many VeRA adapters on one base: the adapter bank, the batched per-row forward, the
continuous-batching engine and the OpenAI-compatible HTTP server (`python -m vera_jax.serving`)."""

from vera_jax.serving.bank import BASE, AdapterBank, AdapterInfo, AdapterRefused, rows_for
from vera_jax.serving.batched import BankDecoder

__all__ = ["BASE", "AdapterBank", "AdapterInfo", "AdapterRefused", "BankDecoder", "rows_for"]
