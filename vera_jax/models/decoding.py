"""Decoder-only language-model machinery shared by GPT-2 and LLaMA.

Holds the pieces both families need beyond `common`: padding-aware causal masks, a
fixed-length KV cache, grouped-query attention, and the jitted generation loops
`greedy` and `beam_search`.

A model call with a cache writes its `T` new keys/values at slots
`[cache["index"], cache["index"] + T)` and attends over all cache slots; the
attention mask then covers the whole cache, shape `(batch, max_length)`, so
left- and right-padded prompts both work: masked slots are never attended and
position ids count only unmasked slots.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position id of each slot = number of unmasked slots before it (0 on leading pads)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def init_cache(batch_size: int, max_length: int, num_layers: int, num_kv_heads: int,
               head_dim: int, dtype) -> dict:
    """Zero KV cache: {"index": 0, "layer_i": {"key", "value"}: (batch, max_length, kv, head_dim)}."""
    shape = (batch_size, max_length, num_kv_heads, head_dim)
    cache = {f"layer_{i}": {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
             for i in range(num_layers)}
    cache["index"] = jnp.zeros((), jnp.int32)
    return cache


def attention_inputs(input_ids, attention_mask, position_ids, cache):
    """Additive attention bias (batch, 1, T, S) and position ids (batch, T) for one call.

    S is T without a cache, else the cache length; `attention_mask` must then be
    (batch, S).
    """
    batch, length = input_ids.shape
    if cache is None:
        keys, start = length, 0
    else:
        keys, start = cache["layer_0"]["key"].shape[1], cache["index"]
    if attention_mask is None:
        mask = jnp.ones((batch, keys), bool)
    else:
        if attention_mask.shape != (batch, keys):
            raise ValueError(
                f"attention_mask has shape {attention_mask.shape}, expected {(batch, keys)}"
                + (" (with a cache the mask covers every cache slot)" if cache is not None else ""))
        mask = attention_mask.astype(bool)
    query_slots = start + jnp.arange(length)
    causal = jnp.arange(keys)[None, :] <= query_slots[:, None]
    bias = jnp.where(causal[None] & mask[:, None, :], 0.0, MASK_VALUE)[:, None]
    if position_ids is None:
        position_ids = jnp.take(positions_from_mask(mask), query_slots, axis=1)
    return bias.astype(jnp.float32), position_ids


def update_cache(layer_cache, index, key, value):
    """Writes key/value (batch, T, kv, hd) at `index`; returns the new layer cache."""
    start = (0, index, 0, 0)
    return {
        "key": jax.lax.dynamic_update_slice(layer_cache["key"], key.astype(layer_cache["key"].dtype), start),
        "value": jax.lax.dynamic_update_slice(
            layer_cache["value"], value.astype(layer_cache["value"].dtype), start),
    }


def attend(query, key, value, bias, scale: float, dropout: Callable[[jax.Array], jax.Array]):
    """Grouped-query attention: query (B,T,H,D), key/value (B,S,KV,D), bias (B,1,T,S) -> (B,T,H*D).

    Scores are softmaxed in float32 as HF does.
    """
    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    query = query.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", query, key).astype(jnp.float32) * scale
    probs = jax.nn.softmax(scores + bias[:, :, None], axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", dropout(probs), value)
    return out.reshape(batch, length, heads * head_dim)


# --- generation -------------------------------------------------------------------------------


def _eos_ids(eos_id) -> np.ndarray:
    """EOS ids as an array, so they are traced, not compiled in; (-1,) for none (never matches)."""
    if eos_id is None:
        return np.full((1,), -1, np.int32)
    return np.asarray((eos_id,) if np.ndim(eos_id) == 0 else eos_id, np.int32).reshape(-1)


def _prefill(model, params, input_ids, attention_mask, max_new_tokens):
    """Runs the prompt through a fresh cache; returns (logits at each row's last real token, cache, full mask)."""
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    mask = jnp.concatenate(
        [attention_mask.astype(jnp.int32), jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    cache = model.init_cache(batch, length + max_new_tokens)
    logits, cache = model.apply({"params": params}, input_ids, attention_mask=mask, cache=cache)
    last = length - 1 - jnp.argmax(attention_mask[:, ::-1], axis=1)
    return logits[jnp.arange(batch), last].astype(jnp.float32), cache, mask


def greedy(model: nn.Module, params, input_ids, attention_mask, max_new_tokens: int,
           eos_id: int | Sequence[int] | None, pad_id: int) -> jax.Array:
    """Greedy decoding with a KV cache, one jitted `while_loop`.

    `params` is a plain params tree (e.g. `merge(adapted)`). The prompt may be left- or
    right-padded. Returns the new tokens only, (batch, max_new_tokens) int32: each row
    stops after its first EOS (kept) and is filled with `pad_id`, like HF `generate`.
    Compiled once per model, input shapes and `max_new_tokens`.
    """
    return _greedy(model, params, input_ids, attention_mask, max_new_tokens, _eos_ids(eos_id), pad_id)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _greedy(model, params, input_ids, attention_mask, max_new_tokens, eos, pad_id):
    batch = input_ids.shape[0]
    logits, cache, mask = _prefill(model, params, input_ids, attention_mask, max_new_tokens)

    def cond(state):
        step, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, logits, tokens, done = state
        token = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = tokens.at[:, step].set(token)
        done = done | jnp.isin(token, eos)
        logits, cache = model.apply({"params": params}, token[:, None], attention_mask=mask, cache=cache)
        return step + 1, cache, logits[:, 0].astype(jnp.float32), tokens, done

    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.zeros((), jnp.int32), cache, logits, tokens, jnp.zeros((batch,), bool))
    return jax.lax.while_loop(cond, body, state)[3]


def _ban_repeated_ngrams(sequences, cur_len, log_probs, n: int):
    """Sets to -inf every token that would repeat an n-gram already in sequences[:, :cur_len] (HF semantics)."""
    rows, length = sequences.shape
    starts = jnp.arange(length - n + 1)
    valid = starts <= cur_len - n
    if n > 1:
        tail = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - (n - 1), 0), n - 1, axis=1)
        windows = jnp.stack([sequences[:, j:j + length - n + 1] for j in range(n - 1)], axis=-1)
        match = jnp.all(windows == tail[:, None, :], axis=-1) & valid[None]
    else:
        match = jnp.broadcast_to(valid[None], (rows, length))
    banned = sequences[:, n - 1:]
    return log_probs.at[jnp.arange(rows)[:, None], banned].min(jnp.where(match, -jnp.inf, jnp.inf))


def beam_search(model: nn.Module, params, input_ids, attention_mask, max_new_tokens: int, num_beams: int,
                length_penalty: float, eos_id: int | Sequence[int] | None, pad_id: int,
                no_repeat_ngram_size: int = 0, early_stopping: bool | str = False,
                return_scores: bool = False):
    """Beam search with a KV cache, one jitted `while_loop`; a port of HF's `_beam_search`.

    Same semantics as HF `generate(num_beams=..., do_sample=False, length_penalty=...,
    early_stopping=..., no_repeat_ngram_size=...)`: a finished hypothesis scores
    sum(log p) / generated_length ** length_penalty (EOS counted), top-K of the
    (1 + #eos) * K continuations are kept running, and `early_stopping` is True, False
    (HF's heuristic) or "never". N-grams are banned over prompt + generated tokens, as HF
    does. Returns the best hypothesis' new tokens, (batch, max_new_tokens) int32 filled
    with `pad_id` after it ends, and with `return_scores` also its score (batch,).
    """
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    tokens, scores = _beam_search(model, params, input_ids, attention_mask, max_new_tokens, num_beams,
                                  np.float32(length_penalty), _eos_ids(eos_id), pad_id, no_repeat_ngram_size,
                                  np.bool_(early_stopping is True), np.bool_(early_stopping == "never"))
    return (tokens, scores) if return_scores else tokens


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "num_beams", "no_repeat_ngram_size"))
def _beam_search(model, params, input_ids, attention_mask, max_new_tokens, num_beams, length_penalty, eos, pad_id,
                 no_repeat_ngram_size, stop_when_full, never_stop_early):
    batch, prompt_len = input_ids.shape
    total_len = prompt_len + max_new_tokens
    keep = max(2, 1 + eos.shape[0]) * num_beams
    logits, cache, mask = _prefill(model, params, input_ids, attention_mask, max_new_tokens)
    vocab = logits.shape[-1]
    cache = jax.tree_util.tree_map(lambda x: jnp.repeat(x, num_beams, axis=0) if x.ndim else x, cache)
    logits = jnp.repeat(logits, num_beams, axis=0)
    mask = jnp.repeat(mask, num_beams, axis=0)
    offsets = (jnp.arange(batch) * num_beams)[:, None]
    top_beam_mask = jnp.arange(keep) < num_beams

    def gather(x, idx):
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def cond(state):
        return (state["step"] < max_new_tokens) & ~state["stop"]

    def body(s):
        cur_len = prompt_len + s["step"]
        log_probs = jax.nn.log_softmax(s["logits"], axis=-1)
        if no_repeat_ngram_size:
            log_probs = _ban_repeated_ngrams(s["running"].reshape(batch * num_beams, total_len), cur_len,
                                             log_probs, no_repeat_ngram_size)
        log_probs = log_probs.reshape(batch, num_beams, vocab) + s["running_scores"][:, :, None]
        topk_scores, topk_idx = jax.lax.top_k(log_probs.reshape(batch, num_beams * vocab), keep)
        topk_beam, topk_token = topk_idx // vocab, (topk_idx % vocab).astype(jnp.int32)
        topk_seqs = gather(s["running"], topk_beam)
        topk_seqs = jax.lax.dynamic_update_slice_in_dim(topk_seqs, topk_token[:, :, None], cur_len, axis=2)
        hits = jnp.isin(topk_token, eos) | (cur_len + 1 >= total_len)

        running_scores = topk_scores - 1.0e9 * hits
        next_idx = jax.lax.top_k(running_scores, num_beams)[1]
        running = gather(topk_seqs, next_idx)
        running_scores = gather(running_scores, next_idx)
        source_beam = gather(topk_beam, next_idx)

        just_finished = hits & top_beam_mask[None]
        final_scores = topk_scores / ((cur_len + 1 - prompt_len).astype(jnp.float32) ** length_penalty)
        final_scores -= 1.0e9 * (jnp.all(s["finished"], axis=-1, keepdims=True) & stop_when_full)
        final_scores -= 1.0e9 * ~s["improvable"]
        final_scores -= 1.0e9 * ~just_finished
        merged_scores = jnp.concatenate([s["scores"], final_scores], axis=1)
        best = jax.lax.top_k(merged_scores, num_beams)[1]
        sequences = gather(jnp.concatenate([s["sequences"], topk_seqs], axis=1), best)
        scores = gather(merged_scores, best)
        finished = gather(jnp.concatenate([s["finished"], just_finished], axis=1), best)

        reorder = (source_beam + offsets).reshape(-1)
        cache = jax.tree_util.tree_map(lambda x: x[reorder] if x.ndim else x, s["cache"])

        cur_len = cur_len + 1
        best_length = jnp.where(never_stop_early & (length_penalty > 0.0), max_new_tokens,
                                cur_len - prompt_len).astype(jnp.float32)
        best_running = running_scores[:, :1] / best_length ** length_penalty
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), -1.0e9)
        improvable = s["improvable"] & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        stop = ~jnp.any(improvable) | jnp.all(hits) | (jnp.all(finished) & stop_when_full)

        last = jax.lax.dynamic_index_in_dim(running, cur_len - 1, axis=2, keepdims=False)
        logits, cache = model.apply({"params": params}, last.reshape(-1, 1), attention_mask=mask, cache=cache)
        return dict(step=s["step"] + 1, stop=stop, cache=cache, logits=logits[:, 0].astype(jnp.float32),
                    running=running, running_scores=running_scores, sequences=sequences, scores=scores,
                    finished=finished, improvable=improvable)

    running = jnp.full((batch, num_beams, total_len), pad_id, jnp.int32)
    running = running.at[:, :, :prompt_len].set(input_ids[:, None, :].astype(jnp.int32))
    state = dict(
        step=jnp.zeros((), jnp.int32), stop=jnp.zeros((), bool), cache=cache, logits=logits,
        running=running,
        running_scores=jnp.zeros((batch, num_beams), jnp.float32).at[:, 1:].set(-1.0e9),
        sequences=running, scores=jnp.full((batch, num_beams), -1.0e9, jnp.float32),
        finished=jnp.zeros((batch, num_beams), bool), improvable=jnp.ones((batch, 1), bool))
    state = jax.lax.while_loop(cond, body, state)
    return state["sequences"][:, 0, prompt_len:], state["scores"][:, 0]
