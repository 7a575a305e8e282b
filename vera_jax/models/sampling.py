"""Sampling one token per row: HF's logits warpers, then a draw seeded per row.

`warp_logits` applies HF's sampling warpers in the order `GenerationMixin._get_logits_processor`
adds them (transformers 5): `TemperatureLogitsWarper`, then `TopKLogitsWarper`, then
`TopPLogitsWarper`, each with `min_tokens_to_keep=1` and filtered logits set to -inf, so the
distribution sampled is HF's `softmax(processed scores)` for `generate(do_sample=True,
temperature=..., top_k=..., top_p=...)`. Note HF's `GenerationConfig` defaults to top_k=50;
here top_k=0 (off) is the default.

Every setting is a scalar or one value per row, so a batch can mix requests (a server's rows).
Row i's draw at step s uses the key `fold_in(key(seeds[i]), s)` alone: its samples depend on
its seed, step and logits, never on the other rows. Streams are JAX's; they are reproducible
for a given JAX version, and equal HF's distributions, not HF's (torch RNG) draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _per_row(value, batch: int, dtype) -> jax.Array:
    """A scalar or (batch,) setting as a (batch, 1) column."""
    return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))[:, None]


def warp_logits(logits: jax.Array, temperature=1.0, top_k=0, top_p=1.0) -> jax.Array:
    """Temperature, then top-k, then top-p filtering of (batch, vocab) logits, as HF does; float32.

    top_k=0 (or >= vocab) and top_p=1.0 turn theirs off. Top-k keeps every token tied with the
    k-th largest (HF's `scores < kth` rule); top-p drops the tokens whose ascending cumulative
    probability is <= 1 - top_p, always keeping the most likely one.
    """
    batch, vocab = logits.shape
    logits = logits.astype(jnp.float32) / _per_row(temperature, batch, jnp.float32)
    k = _per_row(top_k, batch, jnp.int32)
    k = jnp.where((k <= 0) | (k > vocab), vocab, k)
    kth = jnp.take_along_axis(jnp.sort(logits, axis=-1), vocab - k, axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)

    top_p = _per_row(top_p, batch, jnp.float32)
    order = jnp.argsort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
    drop_sorted = (cumulative <= 1.0 - top_p).at[:, -1].set(False) & (top_p < 1.0)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(batch)[:, None], order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits)


def sample_tokens(logits: jax.Array, seeds: jax.Array, step, temperature=1.0, top_k=0, top_p=1.0) -> jax.Array:
    """One token per row (batch,) int32 from `warp_logits(logits, ...)`, row i drawn with
    `fold_in(key(seeds[i]), step)`; `step` is a scalar or one per row (rows at different steps)."""
    batch = logits.shape[0]
    warped = warp_logits(logits, temperature, top_k, top_p)
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.uint32), (batch,))
    keys = jax.vmap(lambda seed, s: jax.random.fold_in(jax.random.key(seed), s))(seeds, steps)
    return jax.vmap(jax.random.categorical)(keys, warped).astype(jnp.int32)


def check_settings(batch: int, seeds, temperature, top_k, top_p) -> dict:
    """Validated sampling settings as arrays (scalars stay scalars); errors name the argument."""

    def array(name, value, dtype, ok, allowed):
        out = np.asarray(value)
        if out.shape not in ((), (batch,)):
            raise ValueError(f"{name}: shape {out.shape}, expected a scalar or ({batch},) (one per row)")
        if not np.all(ok(out)):
            raise ValueError(f"{name}: {value!r} is not allowed; {allowed}")
        return out.astype(dtype)

    seeds = np.asarray(seeds)
    if seeds.shape != (batch,) or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(f"seeds: expected ({batch},) integers (one per row), got shape {seeds.shape} "
                         f"dtype {seeds.dtype}")
    if np.any(seeds < 0) or np.any(seeds >= 2**32):
        raise ValueError("seeds: every seed must be in [0, 2**32)")
    return dict(
        seeds=seeds.astype(np.uint32),
        temperature=array("temperature", temperature, np.float32, lambda t: t > 0, "it must be > 0"),
        top_k=array("top_k", top_k, np.int32, lambda k: (k >= 0) & (k == np.round(k)),
                    "it must be an integer >= 0 (0 = off)"),
        top_p=array("top_p", top_p, np.float32, lambda p: (p >= 0) & (p <= 1), "it must be in [0, 1] (1 = off)"))
