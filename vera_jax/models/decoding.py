"""Decoder-only language-model machinery shared by GPT-2 and LLaMA.

Holds the pieces both families need beyond `common`: padding-aware causal masks, a
fixed-length KV cache and grouped-query attention. The generation loops are in `generate`.

A model call with a cache writes its `T` new keys/values at slots
`[cache["index"], cache["index"] + T)` and attends over all cache slots; the
attention mask then covers the whole cache, shape `(batch, max_length)`, so
left- and right-padded prompts both work: masked slots are never attended and
position ids count only unmasked slots. `cache["index"]` is a scalar (every row at the same
slot, as the generation loops use it) or one index per row, shape `(batch,)` (a serving
engine's slots, each at its own length).

A scanned model (`scan_layers=True`) keeps one stacked cache, {"index", "layer": {"key",
"value"}: (batch, max_length, layers, kv, head_dim)}, carried through its scan: the batch and slot
axes stay first, so the generation loops and the serving engine treat both layouts alike.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

MASK_VALUE = float(jnp.finfo(jnp.float32).min)
STACKED = "layer"  # a scanned model's cache entry, named as its scanned blocks (`common.SCANNED`)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position id of each slot = number of unmasked slots before it (0 on leading pads)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def init_cache(batch_size: int, max_length: int, num_layers: int, num_kv_heads: int,
               head_dim: int, dtype, stacked: bool = False) -> dict:
    """Zero KV cache: {"index": 0, "layer_i": {"key", "value"}: (batch, max_length, kv, head_dim)};
    `stacked` (scanned models): {"index": 0, "layer": {"key", "value"}: (batch, max_length,
    num_layers, kv, head_dim)}."""
    if stacked:
        shape = (batch_size, max_length, num_layers, num_kv_heads, head_dim)
        return {STACKED: {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)},
                "index": jnp.zeros((), jnp.int32)}
    shape = (batch_size, max_length, num_kv_heads, head_dim)
    cache = {f"layer_{i}": {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
             for i in range(num_layers)}
    cache["index"] = jnp.zeros((), jnp.int32)
    return cache


def cache_length(cache: dict) -> int:
    """Slots per row of a KV cache (either layout)."""
    return (cache[STACKED] if STACKED in cache else cache["layer_0"])["key"].shape[1]


def attention_inputs(input_ids, attention_mask, position_ids, cache):
    """Additive attention bias (batch, 1, T, S) and position ids (batch, T) for one call.

    S is T without a cache, else the cache length; `attention_mask` must then be
    (batch, S).
    """
    batch, length = input_ids.shape
    if cache is None:
        keys, start = length, 0
    else:
        keys, start = cache_length(cache), cache["index"]
    if attention_mask is None:
        mask = jnp.ones((batch, keys), bool)
    else:
        if attention_mask.shape != (batch, keys):
            raise ValueError(
                f"attention_mask has shape {attention_mask.shape}, expected {(batch, keys)}"
                + (" (with a cache the mask covers every cache slot)" if cache is not None else ""))
        mask = attention_mask.astype(bool)
    query_slots = jnp.broadcast_to(jnp.reshape(start, (-1, 1)) + jnp.arange(length), (batch, length))
    causal = jnp.arange(keys)[None, None, :] <= query_slots[:, :, None]
    bias = jnp.where(causal & mask[:, None, :], 0.0, MASK_VALUE)[:, None]
    if position_ids is None:
        position_ids = jnp.take_along_axis(positions_from_mask(mask), jnp.minimum(query_slots, keys - 1), axis=1)
    return bias.astype(jnp.float32), position_ids


def sliding_window_bias(bias, start, window: int):
    """`bias` (batch, 1, T, S) with keys `window` or more slots before their query masked too (HF's
    sliding-window layers: a query at slot q sees slots (q - window, q]); `start`: the first query's
    slot (the cache index, a scalar or one per row; 0 without a cache)."""
    if not window or window < 1:
        raise ValueError(f"sliding_window must be a positive number of slots, got {window!r}")
    query_slots = jnp.reshape(start, (-1, 1)) + jnp.arange(bias.shape[2])
    far = jnp.arange(bias.shape[3])[None, None, :] <= query_slots[:, :, None] - window
    return jnp.where(far[:, None], MASK_VALUE, bias)


def update_cache(layer_cache, index, key, value):
    """Writes key/value (batch, T, kv, hd) at `index` (a scalar, or one per row); returns the new
    layer cache."""
    def write(cache, new):
        new = new.astype(cache.dtype)
        if jnp.ndim(index) == 0:
            return jax.lax.dynamic_update_slice(cache, new, (0, index, 0, 0))
        return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (i, 0, 0)))(cache, new, index)

    return {"key": write(layer_cache["key"], key), "value": write(layer_cache["value"], value)}


def write_cache(layer_cache, index, key, value):
    """(new layer cache, keys, values to attend over) after writing key/value (batch, T, kv, hd) at
    `index`. `layer_cache` is one layer's {"key", "value"}, or a scanned model's view of the stacked
    cache ({"key", "value"}: (batch, slots, layers, kv, hd) and its "layer" index): only the T new
    entries of that layer are written, so the stack is updated in place inside the scan."""
    if "layer" not in layer_cache:
        layer_cache = update_cache(layer_cache, index, key, value)
        return layer_cache, layer_cache["key"], layer_cache["value"]
    layer = layer_cache["layer"]

    def write(stack, new):
        new = new.astype(stack.dtype)[:, :, None]
        if jnp.ndim(index) == 0:
            return jax.lax.dynamic_update_slice(stack, new, (0, index, layer, 0, 0))
        return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (i, layer, 0, 0)))(stack, new, index)

    stacks = {name: write(layer_cache[name], new) for name, new in (("key", key), ("value", value))}
    key, value = (jax.lax.dynamic_index_in_dim(stacks[name], layer, axis=2, keepdims=False) for name in stacks)
    return {**stacks, "layer": layer}, key, value


def attend(query, key, value, bias, scale: float, dropout: Callable[[jax.Array], jax.Array],
           softcap: float | None = None):
    """Grouped-query attention: query (B,T,H,D), key/value (B,S,KV,D), bias (B,1,T,S) -> (B,T,H*D).

    Scores are softmaxed in float32 as HF does; `softcap` (Gemma 2) maps scaled scores to
    softcap * tanh(scores / softcap) before the mask is added.
    """
    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    query = query.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", query, key).astype(jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    probs = jax.nn.softmax(scores + bias[:, :, None], axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", dropout(probs), value)
    return out.reshape(batch, length, heads * head_dim)

