"""Next-token cross-entropy without all the logits at once.

A causal LM's logits are (batch, T, vocab) floats: for Gemma 3's 262K vocabulary one 8 x 128
batch is ~1 GB in float32, more than the rest of a small model's activations. `chunked_token_losses`
runs the LM head on `chunk` positions at a time inside a `lax.scan` whose body is under
`jax.checkpoint`: the forward keeps only each chunk's losses, and the backward recomputes one
chunk's logits at a time, so the memory the loss adds is O(chunk x vocab) in both directions. The
value and gradient equal the full computation's (only the summation order differs).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def token_losses_from_logits(logits, targets, smoothing: float = 0.0):
    """Per-position (1 - s) * NLL + s * (cross-entropy against the uniform distribution),
    float32, from logits (..., vocab) and target ids (...)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if not smoothing:
        return nll
    return (1.0 - smoothing) * nll + smoothing * (lse - logits.mean(-1))


def chunked_token_losses(hidden, targets, head_fn: Callable, chunk: int, smoothing: float = 0.0):
    """`token_losses_from_logits(head_fn(hidden), targets, smoothing)`, (..., T) float32, computing
    the logits of about `chunk` positions at a time (forward and backward): a slice of
    max(1, chunk // rows) sequence positions of every row, so the rows (the batch axis, sharded
    over data-parallel devices) stay where they are.

    hidden: (..., T, width) the LM head's input; targets: (..., T) int ids; head_fn(h (rows, c,
    width)) -> logits (rows, c, vocab), e.g. a model's `logits_from_hidden` on fixed params
    (gradients flow to whatever it closes over)."""
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"loss_chunk: expected a positive number of positions, got {chunk!r}")
    if targets.ndim < 1 or hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {hidden.shape} must be targets {targets.shape} + (width,)")
    shape, width = targets.shape, hidden.shape[-1]
    length = shape[-1]
    h, t = hidden.reshape(-1, length, width), targets.reshape(-1, length)
    rows = t.shape[0]
    step = max(1, min(chunk // rows, length))
    pad = -length % step
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        t = jnp.pad(t, ((0, 0), (0, pad)))
    n = (length + pad) // step
    h = jnp.moveaxis(h.reshape(rows, n, step, width), 1, 0)  # (n, rows, step, width)
    t = jnp.moveaxis(t.reshape(rows, n, step), 1, 0)

    @jax.checkpoint
    def one(h_c, t_c):
        return token_losses_from_logits(head_fn(h_c), t_c, smoothing)

    _, out = jax.lax.scan(lambda carry, xs: (carry, one(*xs)), None, (h, t))
    return jnp.moveaxis(out, 0, 1).reshape(rows, -1)[:, :length].reshape(shape)
