"""Greedy decoding, sampling and beam search over a step function, for any decoder family.

The loops never look inside params; a `Decoder` says how to run the model:

    prepare(params, tokens) -> prepared      once per generate call, inside the jitted function
                                             (e.g. merge an adapter once, not once per token);
                                             `tokens`: token rows the call runs (prefill + decode)
    apply(prepared, input_ids, attention_mask, cache, rows) -> (logits, cache)
                                             one model call; `rows` is the caller's per-row
                                             inputs (a pytree with a leading batch axis, e.g. a
                                             server's adapter ids, or None), repeated per beam
    init_cache(batch, max_length) -> cache   {"index": scalar, ...: arrays with a batch axis}

`ModelDecoder` is the one for GPT-2/LLaMA-style linen models on a plain params tree or an
`Adapted` tree (merged, factored or auto path); a per-row adapter bank is another Decoder. A
Decoder is a static argument of the jitted loops, so it must be hashable and compare equal when
it decodes the same way (a frozen dataclass): each loop compiles once per decoder, input shapes,
`max_new_tokens` (and beam settings), while params, prompts, seeds, EOS/pad ids and sampling
settings are traced.

Each loop prefills the prompt (left- or right-padded) into a cache of prompt + max_new_tokens
slots, then runs one `while_loop` step per token. Rows stop after their first EOS (kept) and are
filled with `pad_id`, like HF `generate`; greedy and beam search are token-identical to it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vera_jax.adapters.core import Adapted, merge
from vera_jax.adapters.factored import call_adapted, layer_path
from vera_jax.models import sampling as sampling_lib
from vera_jax.quant import maybe_dequantized, quantized_paths

PATHS = ("merged", "factored", "auto")


class Decoder(Protocol):
    """How the generation loops run a model (see the module docstring)."""

    def prepare(self, params, tokens: int) -> Any: ...

    def apply(self, prepared, input_ids, attention_mask, cache, rows) -> tuple[jax.Array, Any]: ...

    def init_cache(self, batch_size: int, max_length: int) -> Any: ...


@dataclasses.dataclass(frozen=True)
class ModelDecoder:
    """A linen causal LM with `init_cache` whose `apply(..., cache=)` returns (logits, cache).

    path: None for a plain params tree; for an `Adapted` tree, "merged" folds every adapter into
      its kernel once per call, "factored" adds each layer's low-rank term at every model call
      (`call_adapted(path="factored")`), and "auto" merges the layers where `choose_path` finds
      one merge cheaper than the factored term over all `tokens` of the call, factoring the rest
      (`factored.layer_path`, which `call_adapted` asks too: a quantized layer is never merged).
    """

    model: nn.Module
    path: str | None = None

    def __post_init__(self):
        if self.path not in (None, *PATHS):
            raise ValueError(f"path: {self.path!r} is not one of [None, 'merged', 'factored', 'auto']")

    def init_cache(self, batch_size: int, max_length: int):
        return self.model.init_cache(batch_size, max_length)

    def prepare(self, params, tokens: int):
        """Plain params, or an `Adapted` whose base holds the merged layers and whose `layers`
        are the ones left to factor."""
        if self.path is None:
            if isinstance(params, Adapted):
                raise ValueError("path: an Adapted params tree needs path 'merged', 'factored' or 'auto'")
            return params
        if not isinstance(params, Adapted):
            raise TypeError(f"params: path={self.path!r} needs an Adapted tree, got {type(params).__name__}")

        quantized = quantized_paths(params.base)

        def merges(spec) -> bool:  # as call_adapted: "merged" merges all (merge refuses a quantized kernel)
            return self.path == "merged" or layer_path(params, spec, tokens, self.path, train=False,
                                                       quantized=quantized) == "merged"

        merged = tuple(s for s in params.layers if merges(s))
        factored = tuple(s for s in params.layers if not merges(s))
        base = merge(params.replace(layers=merged)) if merged else params.base
        return params.replace(base=base, layers=factored) if factored else base

    def apply(self, prepared, input_ids, attention_mask, cache, rows):
        if rows is not None:
            raise ValueError("rows: ModelDecoder takes no per-row inputs; pass None")

        def run(params):
            return self.model.apply({"params": params}, input_ids, attention_mask=attention_mask, cache=cache)

        if isinstance(prepared, Adapted):
            return call_adapted(run, prepared, path="factored", train=False)
        with maybe_dequantized(prepared):
            return run(prepared)


def as_decoder(model, params, path: str | None = None):
    """`model` itself if it is a Decoder, else `ModelDecoder(model, path)`; path defaults to
    "auto" for an `Adapted` params tree (as `call_adapted` does) and None for a plain one."""
    if isinstance(model, nn.Module):
        return ModelDecoder(model, "auto" if path is None and isinstance(params, Adapted) else path)
    if path is not None:
        raise ValueError("path: only for a linen model; a Decoder chooses its own path")
    if not all(callable(getattr(model, name, None)) for name in ("prepare", "apply", "init_cache")):
        raise TypeError(f"model: expected a linen Module or a Decoder, got {type(model).__name__}")
    return model


def _eos_ids(eos_id) -> np.ndarray:
    """EOS ids as an array, so they are traced, not compiled in; (-1,) for none (never matches)."""
    if eos_id is None:
        return np.full((1,), -1, np.int32)
    return np.asarray((eos_id,) if np.ndim(eos_id) == 0 else eos_id, np.int32).reshape(-1)


def _inputs(input_ids, attention_mask, max_new_tokens: int):
    """int32 prompt ids and mask (all ones when None), checked against each other."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected (batch, length), got shape {input_ids.shape}")
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: shape {mask.shape}, expected input_ids' {input_ids.shape}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: {max_new_tokens!r}, expected an integer >= 1")
    return input_ids, mask


def _prefill(decoder, prepared, input_ids, attention_mask, rows, max_new_tokens):
    """Runs the prompt through a fresh cache; returns (logits at each row's last real token, cache, full mask)."""
    batch, length = input_ids.shape
    mask = jnp.concatenate([attention_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    cache = decoder.init_cache(batch, length + max_new_tokens)
    logits, cache = decoder.apply(prepared, input_ids, mask, cache, rows)
    last = length - 1 - jnp.argmax(attention_mask[:, ::-1], axis=1)
    return logits[jnp.arange(batch), last].astype(jnp.float32), cache, mask


def greedy(model, params, input_ids, attention_mask, max_new_tokens: int, eos_id: int | Sequence[int] | None,
           pad_id: int, *, path: str | None = None, rows=None) -> jax.Array:
    """Greedy decoding: the new tokens only, (batch, max_new_tokens) int32.

    model: a linen model (params: a plain tree, or an `Adapted` decoded on `path`, default
      "auto") or a `Decoder` (params: whatever its `prepare` takes; `rows`: its per-row inputs).
    """
    input_ids, mask = _inputs(input_ids, attention_mask, max_new_tokens)
    return _decode(as_decoder(model, params, path), params, input_ids, mask, rows, max_new_tokens,
                   _eos_ids(eos_id), pad_id, None)


def sample(model, params, input_ids, attention_mask, max_new_tokens: int, eos_id: int | Sequence[int] | None,
           pad_id: int, *, seeds, temperature=1.0, top_k=0, top_p=1.0, path: str | None = None,
           rows=None) -> jax.Array:
    """Sampling: the new tokens only, (batch, max_new_tokens) int32; `model`, `params`, `path`
    and `rows` as in `greedy`.

    seeds: (batch,) integers in [0, 2**32); row i's tokens depend only on its seed and prompt.
    temperature, top_k, top_p: HF's warpers in HF's order (`sampling.warp_logits`), each a
      scalar or one value per row; top_k=0 and top_p=1.0 are off.
    """
    input_ids, mask = _inputs(input_ids, attention_mask, max_new_tokens)
    settings = sampling_lib.check_settings(input_ids.shape[0], seeds, temperature, top_k, top_p)
    return _decode(as_decoder(model, params, path), params, input_ids, mask, rows, max_new_tokens,
                   _eos_ids(eos_id), pad_id, settings)


@functools.partial(jax.jit, static_argnames=("decoder", "max_new_tokens"))
def _decode(decoder, params, input_ids, attention_mask, rows, max_new_tokens, eos, pad_id, settings):
    """Greedy (`settings` None) or sampling loop."""
    batch, length = input_ids.shape
    prepared = decoder.prepare(params, batch * (length + max_new_tokens))
    logits, cache, mask = _prefill(decoder, prepared, input_ids, attention_mask, rows, max_new_tokens)

    def cond(state):
        step, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, logits, tokens, done = state
        if settings is None:
            choice = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            choice = sampling_lib.sample_tokens(logits, step=step, **settings)
        token = jnp.where(done, pad_id, choice)
        tokens = tokens.at[:, step].set(token)
        done = done | jnp.isin(token, eos)
        logits, cache = decoder.apply(prepared, token[:, None], mask, cache, rows)
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


def beam_search(model, params, input_ids, attention_mask, max_new_tokens: int, num_beams: int,
                length_penalty: float, eos_id: int | Sequence[int] | None, pad_id: int,
                no_repeat_ngram_size: int = 0, early_stopping: bool | str = False,
                return_scores: bool = False, *, path: str | None = None, rows=None):
    """Beam search, a port of HF's `_beam_search`; `model`, `params`, `path`, `rows` as in `greedy`.

    Same semantics as HF `generate(num_beams=..., do_sample=False, length_penalty=...,
    early_stopping=..., no_repeat_ngram_size=...)`: a finished hypothesis scores
    sum(log p) / generated_length ** length_penalty (EOS counted), top-K of the
    (1 + #eos) * K continuations are kept running, and `early_stopping` is True, False
    (HF's heuristic) or "never". N-grams are banned over prompt + generated tokens, as HF
    does. Returns the best hypothesis' new tokens, (batch, max_new_tokens) int32 filled
    with `pad_id` after it ends, and with `return_scores` also its score (batch,).
    """
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping: {early_stopping!r} is not one of [True, False, 'never']")
    if not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise ValueError(f"num_beams: {num_beams!r}, expected an integer >= 1")
    input_ids, mask = _inputs(input_ids, attention_mask, max_new_tokens)
    tokens, scores = _beam_search(as_decoder(model, params, path), params, input_ids, mask, rows, max_new_tokens,
                                  num_beams, np.float32(length_penalty), _eos_ids(eos_id), pad_id,
                                  no_repeat_ngram_size, np.bool_(early_stopping is True),
                                  np.bool_(early_stopping == "never"))
    return (tokens, scores) if return_scores else tokens


@functools.partial(jax.jit, static_argnames=("decoder", "max_new_tokens", "num_beams", "no_repeat_ngram_size"))
def _beam_search(decoder, params, input_ids, attention_mask, rows, max_new_tokens, num_beams, length_penalty, eos,
                 pad_id, no_repeat_ngram_size, stop_when_full, never_stop_early):
    batch, prompt_len = input_ids.shape
    total_len = prompt_len + max_new_tokens
    keep = max(2, 1 + eos.shape[0]) * num_beams
    prepared = decoder.prepare(params, batch * (prompt_len + num_beams * max_new_tokens))
    logits, cache, mask = _prefill(decoder, prepared, input_ids, attention_mask, rows, max_new_tokens)
    vocab = logits.shape[-1]

    def per_beam(tree):
        return jax.tree.map(lambda x: jnp.repeat(x, num_beams, axis=0) if x.ndim else x, tree)

    cache, logits, mask, rows = per_beam(cache), per_beam(logits), per_beam(mask), per_beam(rows)
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
        cache = jax.tree.map(lambda x: x[reorder] if x.ndim else x, s["cache"])

        cur_len = cur_len + 1
        best_length = jnp.where(never_stop_early & (length_penalty > 0.0), max_new_tokens,
                                cur_len - prompt_len).astype(jnp.float32)
        best_running = running_scores[:, :1] / best_length ** length_penalty
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), -1.0e9)
        improvable = s["improvable"] & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        stop = ~jnp.any(improvable) | jnp.all(hits) | (jnp.all(finished) & stop_when_full)

        last = jax.lax.dynamic_index_in_dim(running, cur_len - 1, axis=2, keepdims=False)
        logits, cache = decoder.apply(prepared, last.reshape(-1, 1), mask, cache, rows)
        return dict(step=s["step"] + 1, stop=stop, cache=cache, logits=logits[:, 0].astype(jnp.float32),
                    running=running, running_scores=running_scores, sequences=sequences, scores=scores,
                    finished=finished, improvable=improvable)

    running = jnp.full((batch, num_beams, total_len), pad_id, jnp.int32)
    running = running.at[:, :, :prompt_len].set(input_ids[:, None, :])
    state = dict(
        step=jnp.zeros((), jnp.int32), stop=jnp.zeros((), bool), cache=cache, logits=logits,
        running=running,
        running_scores=jnp.zeros((batch, num_beams), jnp.float32).at[:, 1:].set(-1.0e9),
        sequences=running, scores=jnp.full((batch, num_beams), -1.0e9, jnp.float32),
        finished=jnp.zeros((batch, num_beams), bool), improvable=jnp.ones((batch, 1), bool))
    state = jax.lax.while_loop(cond, body, state)
    return state["sequences"][:, 0, prompt_len:], state["scores"][:, 0]
