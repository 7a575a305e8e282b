"""What every data reader shares: the offline error and the reachability probes behind it."""

from __future__ import annotations

from vera_jax.network import hub_unreachable, reachable

__all__ = ["DataUnavailableError", "hub_unreachable", "reachable"]


class DataUnavailableError(RuntimeError):
    """The data is neither local nor downloadable (no network); the message says what to pass."""
