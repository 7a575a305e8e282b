"""Continuous batching over an adapter bank: a fixed number of slots, requests join and leave
between decode steps.

Each slot owns one row of a KV cache of `max_length` positions whose write index is per row
(`decoding.update_cache` with a (slots,) index), so slots sit at different lengths. Waiting
requests join free slots together: every step admits as many as there are free slots and
prefills them in one call per prompt bucket (prompts right-padded to the bucket, rows padded to
a power of two), each row written into its slot's first positions; then ONE decode call runs over
all slots, each row with its own adapter (`BankDecoder` rows), sampling settings, seed and step.
Rows leave on a stop id (EOS, a chat end-of-turn: `eos_ids`), a stop string, `max_tokens` or the end of
the context; their slot is reused at the next step. Prefill rows are independent, so a request's
tokens do not depend on which others share its prefill.

Compiled shapes (never one per request): one decode step for (slots, 1) tokens, and one prefill
per (prompt bucket, row count): buckets are `prefill_buckets` (default powers of two from 16 up to
`max_length`), row counts powers of two up to `prefill_batch` rows and `prefill_tokens` tokens per
call; each has a variant that also returns logprobs, compiled only when a request asks for them.
All of it for the current bank structure: a bank change that adds a group or a layer, or doubles
a group's capacity, retraces once; loading an adapter into free capacity does not. `compiles`
counts every trace; `warmup()` compiles every shape up front.

Logprobs (`Request.logprobs`, `Request.prompt_logprobs`): log-softmax of the model's raw logits
(before temperature and top-p, as vLLM's default), in float32, for each generated token (the
sampled one and the `logprobs` most likely) and, for the prompt, each token after the first given
the ones before it. Computed in the jitted calls with a fixed top-k of `MAX_TOP_LOGPROBS`.

Streaming: `submit(request, on_token=f)` calls `f(token_id)` on the engine thread for every token
as it is sampled, before the request can finish, so a caller sees all of its tokens and then the
future. `cancel(future)` ends a request early (a client that went away): queued, it never starts;
running, its slot is freed before the next decode step. Neither adds a compile or changes a batch:
a cancelled row leaves exactly as a finished one does.

Adapters: `submit` binds a request to the version of its adapter loaded at that moment (every
load is a new version, even under a name used before). `unload(name)` ends the queued requests
bound to it with `AdapterUnloaded`; running ones finish on the rows they pinned; a request never
runs on another version than the one it was admitted with.

Sampling: temperature 0 is greedy (argmax); otherwise HF's temperature and top-p warpers and a
draw keyed by (seed, step) as `sampling.sample_tokens` does, so a request's tokens depend only on
its prompt, adapter, settings and seed, never on the other rows.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import secrets
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vera_jax.models import sampling
from vera_jax.serving import chat
from vera_jax.serving.bank import BASE, AdapterBank, AdapterUnloaded, rows_for
from vera_jax.serving.batched import BankDecoder

MAX_TOP_LOGPROBS = 20   # the most alternatives per position a request may ask for (OpenAI chat's limit)


class RequestError(ValueError):
    """A request the engine cannot run; the message names the field."""


@dataclasses.dataclass
class Request:
    """One generation: token ids in, up to `max_tokens` new tokens out."""

    prompt: list[int]
    model: str = BASE
    max_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None       # None: no logprobs; k: each new token's and its k most likely
    prompt_logprobs: int | None = None  # None: none; k: every prompt token's (after the first) and k most likely
    version: int | None = None        # the adapter version it runs on; `submit` binds the current one


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the `top` most likely tokens at its position, (id, logprob), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass
class Completion:
    token_ids: list[int]
    text: str | None
    finish_reason: str                # "stop" (a stop id or a stop string) or "length"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None          # one per token_ids entry, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (the first: None), when asked


@dataclasses.dataclass
class _Active:
    request: Request
    future: concurrent.futures.Future
    ref: tuple | None
    seed: int
    on_token: Callable[[int], None] | None = None
    slot: int = -1
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    prompt_logprobs: list | None = None


def _choose(logits, greedy, seeds, steps, temperature, top_p):
    """Per row: argmax where greedy, else a seeded top-p draw (as sampling.sample_tokens)."""
    safe_t = jnp.where(greedy, 1.0, temperature)
    drawn = sampling.sample_tokens(logits, seeds, steps, safe_t, 0, top_p)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), drawn)


def _token_logprobs(logits, tokens, k: int):
    """log-softmax of `logits` (..., vocab) at `tokens` (...), and its top k: (logprob, top ids, top logprobs)."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0]
    top_values, top_ids = jax.lax.top_k(lp, k)
    return chosen, top_ids.astype(jnp.int32), top_values


def _entry(token, logprob, ids, values, k: int) -> TokenLogprob:
    return TokenLogprob(int(token), float(logprob), tuple((int(i), float(v)) for i, v in zip(ids[:k], values[:k])))


def _pow2_sizes(cap: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `cap`, and `cap` itself."""
    return tuple(sorted({min(2**k, cap) for k in range(cap.bit_length() + 1)}))


class Engine:
    """Slots, a request queue and a background loop (`start` / `stop`); `submit` is thread-safe.

    model: the linen causal LM; bank: its `AdapterBank`; tokenizer: decodes text for stop strings
    and `Completion.text` (None: token ids only, no stop strings); eos_ids: tokens that end a row
    (default: `chat.stop_ids(tokenizer)`, the tokenizer's eos and its chat template's end-of-turn token;
    the server adds the model config's, see chat.py); prefill_batch: the most prompts prefilled in one call
    (default: slots; 1 prefills one at a time); prefill_tokens: the most padded prompt tokens in one
    prefill call (it bounds the (rows, bucket, vocab) logits), at least one prompt whatever its bucket.
    """

    def __init__(self, model, bank: AdapterBank, *, slots: int = 8, max_length: int = 256, tokenizer=None,
                 eos_ids=None, prefill_buckets: tuple[int, ...] | None = None, prefill_batch: int | None = None,
                 prefill_tokens: int = 2048):
        if slots < 1 or max_length < 2:
            raise ValueError(f"slots: {slots}, max_length: {max_length}; expected slots >= 1, max_length >= 2")
        prefill_batch = slots if prefill_batch is None else prefill_batch
        if prefill_batch < 1 or prefill_tokens < 1:
            raise ValueError(f"prefill_batch: {prefill_batch}, prefill_tokens: {prefill_tokens}; expected both >= 1")
        self.model, self.bank, self.tokenizer = model, bank, tokenizer
        self.slots, self.max_length = slots, max_length
        self.eos_ids = frozenset(chat.stop_ids(tokenizer) if eos_ids is None else (int(e) for e in eos_ids))
        if prefill_buckets is None:
            prefill_buckets = tuple(sorted({min(2**k, max_length) for k in range(4, max_length.bit_length() + 1)}))
        if max(prefill_buckets) < max_length - 1 or min(prefill_buckets) < 1 or max(prefill_buckets) > max_length:
            raise ValueError(f"prefill_buckets: {prefill_buckets}; they must lie in [1, {max_length}] and reach "
                             f"{max_length - 1}")
        self.buckets = tuple(sorted(prefill_buckets))
        self.prefill_sizes = {b: _pow2_sizes(max(1, min(prefill_batch, prefill_tokens // b))) for b in self.buckets}
        self.top_k = min(MAX_TOP_LOGPROBS, model.vocab_size)
        self.compiles = collections.Counter()       # "decode" / "prefill" -> traces
        self.prefill_rows = collections.Counter()   # requests per prefill call -> calls
        self._decode_jit = jax.jit(self._decode_step, static_argnums=(0, 1), donate_argnums=(3,))
        self._prefill_jit = jax.jit(self._prefill, static_argnums=(0, 1), donate_argnums=(3,))
        cache = model.init_cache(slots, max_length)
        self._cache = {**cache, "index": jnp.zeros((slots,), jnp.int32)}
        self._active: list[_Active | None] = [None] * slots
        self._next = np.zeros((slots,), np.int32)    # each row's next input token
        self._queue: collections.deque = collections.deque()
        self._doomed: set = set()                    # futures of running requests to cancel at the next step
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.generated = 0

    # ------------------------------------------------------------------------------ jitted parts
    def _decode_step(self, decoder, logprobs, arrays, cache, tokens, rows, active, greedy, seeds, steps, temperature,
                     top_p):
        """One token for every slot: (tokens, cache, logprobs or None)."""
        self.compiles["decode"] += 1
        mask = jnp.ones((tokens.shape[0], self.max_length), jnp.int32)
        logits, cache = decoder.apply(arrays, tokens[:, None], mask, cache, rows)
        cache["index"] = jnp.where(active, cache["index"], 0)
        logits = logits[:, 0].astype(jnp.float32)
        chosen = _choose(logits, greedy, seeds, steps, temperature, top_p)
        return chosen, cache, _token_logprobs(logits, chosen, self.top_k) if logprobs else None

    def _prefill(self, decoder, logprobs, arrays, cache, slots, prompts, lengths, rows, greedy, seeds, temperature,
                 top_p):
        """Prompts (rows, bucket), right-padded, into cache rows `slots` (out of range: not written); each
        row's first token, the cache, and with `logprobs` (first token's, prompt tokens') logprobs."""
        self.compiles["prefill"] += 1
        batch, bucket = prompts.shape
        small = decoder.init_cache(batch, bucket)
        small = {**small, "index": jnp.zeros((batch,), jnp.int32)}
        logits, small = decoder.apply(arrays, prompts, jnp.ones((batch, bucket), jnp.int32), small, rows)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        tokens = _choose(last, greedy, seeds, jnp.zeros((batch,), jnp.int32), temperature, top_p)
        out = {"index": cache["index"].at[slots].set(lengths, mode="drop")}
        for name, layer in cache.items():
            if name != "index":
                out[name] = {k: v.at[slots, :bucket].set(small[name][k].astype(v.dtype), mode="drop")
                             for k, v in layer.items()}
        if not logprobs:
            return tokens, out, None
        prompt_lp = _token_logprobs(logits[:, :-1], prompts[:, 1:], self.top_k)
        return tokens, out, (_token_logprobs(last, tokens, self.top_k), prompt_lp)

    # ------------------------------------------------------------------------------ requests
    def check(self, request: Request) -> None:
        """Raises RequestError (naming the field) or KeyError (unknown model) before queueing."""
        n = len(request.prompt)
        if n == 0:
            raise RequestError("prompt: empty; at least one token is needed")
        least = 0 if request.prompt_logprobs is not None else 1
        if not isinstance(request.max_tokens, int) or request.max_tokens < least:
            raise RequestError(f"max_tokens: {request.max_tokens!r}; expected an integer >= {least}"
                               + (" (0 only with prompt_logprobs)" if least else ""))
        if n + request.max_tokens > self.max_length or n > self.buckets[-1]:
            raise RequestError(f"prompt: {n} tokens + max_tokens {request.max_tokens} exceed the context of "
                               f"{min(self.max_length, self.buckets[-1] + request.max_tokens)} tokens")
        for field in ("logprobs", "prompt_logprobs"):
            k = getattr(request, field)
            if k is not None and (not isinstance(k, int) or not 0 <= k <= self.top_k):
                raise RequestError(f"{field}: {k!r}; expected an integer from 0 to {self.top_k}, or None")
        if not 0 <= request.temperature <= 100:
            raise RequestError(f"temperature: {request.temperature!r}; expected 0 (greedy) to 100")
        if not 0 < request.top_p <= 1:
            raise RequestError(f"top_p: {request.top_p!r}; expected 0 < top_p <= 1")
        if request.seed is not None and not 0 <= request.seed < 2**32:
            raise RequestError(f"seed: {request.seed!r}; expected an integer in [0, 2**32)")
        if request.stop and self.tokenizer is None:
            raise RequestError("stop: stop strings need a tokenizer; this engine has none")
        vocab = self.model.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt):
            raise RequestError(f"prompt: token ids must lie in [0, {vocab})")
        if request.model != BASE and request.model not in self.bank.names():
            raise KeyError(self.bank.unknown(request.model))

    def submit(self, request: Request, on_token: Callable[[int], None] | None = None) -> concurrent.futures.Future:
        """Queues `request` (checked first); the future gets a Completion or the exception.

        on_token: called with each new token id on the engine thread, in order, before the future
        resolves; it must be quick (it runs between decode steps of every row). If it raises, the
        request ends with that exception and the others go on.
        """
        self.check(request)
        if request.model != BASE and request.version is None:
            request = dataclasses.replace(request, version=self.bank.info(request.model).version)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._queue.append((request, future, on_token))
            self._cond.notify()
        return future

    def cancel(self, future: concurrent.futures.Future) -> None:
        """Ends the request behind `future` (thread-safe; a finished one is left alone).

        A queued request is cancelled at once; a running one cannot be (its future is running), so
        the loop frees its slot before the next decode step and sets CancelledError on the future.
        """
        if future.done() or future.cancel():
            return
        with self._cond:
            self._doomed.add(future)
            self._cond.notify()

    def unload(self, name: str) -> None:
        """Unloads adapter `name` from the bank; its queued requests end now with AdapterUnloaded
        (running ones finish on the version they started with)."""
        version = self.bank.unload(name)
        with self._cond:
            gone = [e for e in self._queue if e[0].model == name and e[0].version == version]
            for entry in gone:
                self._queue.remove(entry)
        for _, future, _ in gone:
            if future.set_running_or_notify_cancel():
                future.set_exception(AdapterUnloaded(f"model {name!r} was unloaded"))

    def generate(self, requests: list[Request], timeout: float = 600.0) -> list[Completion]:
        """Runs `requests` to completion (starting the loop if needed); in order."""
        futures = [self.submit(r) for r in requests]
        if self._thread is None:
            while not all(f.done() for f in futures):
                self.step()
        return [f.result(timeout=timeout) for f in futures]

    # ------------------------------------------------------------------------------ the loop
    def _admit(self) -> None:
        """Takes waiting requests into free slots (a prompt-only request needs none) and prefills them
        together, one call per bucket and chunk of at most the largest row count."""
        admitted = []
        with self._cond:
            free = [i for i, a in enumerate(self._active) if a is None]
            while self._queue and len(admitted) < self.slots and (free or self._queue[0][0].max_tokens == 0):
                request, future, on_token = self._queue.popleft()
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    ref = self.bank.pin(request.model, request.version)
                except KeyError as e:                      # unloaded while queued
                    future.set_exception(e)
                    continue
                seed = secrets.randbelow(2**32) if request.seed is None else request.seed
                slot = free.pop(0) if request.max_tokens > 0 else self.slots   # out of range: cache not written
                admitted.append(_Active(request, future, ref, seed, on_token, slot))
        if not admitted:
            return
        structure, arrays = self.bank.snapshot()      # after the pins: holds every admitted adapter's row
        decoder = BankDecoder(self.model, structure)
        by_bucket: dict[int, list[_Active]] = {}
        for a in admitted:
            by_bucket.setdefault(next(b for b in self.buckets if b >= len(a.request.prompt)), []).append(a)
        for bucket, group in sorted(by_bucket.items()):
            most = self.prefill_sizes[bucket][-1]
            for i in range(0, len(group), most):
                self._prefill_rows(decoder, structure, arrays, bucket, group[i: i + most])

    def _prefill_rows(self, decoder, structure, arrays, bucket: int, group: list[_Active]) -> None:
        """Prefills `group` (prompts of one bucket) in one call, rows padded to the next compiled count
        (padding rows write nowhere); then each request's first token, or its end if it asked for none."""
        size = next(n for n in self.prefill_sizes[bucket] if n >= len(group))
        pad = size - len(group)
        prompts = np.zeros((size, bucket), np.int32)
        for row, a in enumerate(group):
            prompts[row, : len(a.request.prompt)] = a.request.prompt
        requests = [a.request for a in group]
        lengths = np.asarray([len(r.prompt) for r in requests] + [1] * pad, np.int32)
        slots = np.asarray([a.slot for a in group] + [self.slots] * pad, np.int32)
        rows = rows_for(structure, [a.ref for a in group] + [None] * pad)
        greedy = np.asarray([r.temperature == 0 for r in requests] + [True] * pad)
        seeds = np.asarray([a.seed for a in group] + [0] * pad, np.uint32)
        temperature = np.asarray([r.temperature for r in requests] + [1.0] * pad, np.float32)
        top_p = np.asarray([r.top_p for r in requests] + [1.0] * pad, np.float32)
        want = any(r.logprobs is not None or r.prompt_logprobs is not None for r in requests)
        try:
            tokens, self._cache, lp = self._prefill_jit(decoder, want, arrays, self._cache, slots, prompts, lengths,
                                                        rows, greedy, seeds, temperature, top_p)
            tokens, lp = np.asarray(tokens), jax.tree.map(np.asarray, lp)
        except Exception as e:  # noqa: BLE001 (a failing prefill fails its requests, never the engine)
            for a in group:
                self.bank.unpin(a.ref)
                a.future.set_exception(e)
            return
        self.prefill_rows[len(group)] += 1
        for row, a in enumerate(group):
            if a.request.prompt_logprobs is not None:
                chosen, ids, values = (x[row] for x in lp[1])
                a.prompt_logprobs = [None] + [_entry(a.request.prompt[j + 1], chosen[j], ids[j], values[j],
                                                     a.request.prompt_logprobs)
                                              for j in range(len(a.request.prompt) - 1)]
            if a.request.max_tokens == 0:
                self.bank.unpin(a.ref)
                a.future.set_result(Completion([], "" if self.tokenizer is not None else None, "length",
                                               len(a.request.prompt), [] if a.request.logprobs is not None else None,
                                               a.prompt_logprobs))
                continue
            self._active[a.slot] = a
            self._emit(a.slot, int(tokens[row]), None if lp is None else tuple(x[row] for x in lp[0]))

    def _emit(self, slot: int, token: int, lp=None) -> None:
        """Appends a token (and its logprobs: (logprob, top ids, top logprobs)) to the slot's request;
        finishes it on EOS, stop string or length."""
        active = self._active[slot]
        active.tokens.append(token)
        if active.request.logprobs is not None:
            active.logprobs.append(_entry(token, *lp, active.request.logprobs))
        self._next[slot] = token
        self.generated += 1
        if active.on_token is not None:
            try:
                active.on_token(token)
            except Exception as e:  # noqa: BLE001 (a caller's callback never stops the engine)
                self._drop(slot, e)
                return
        request, reason = active.request, None
        text = None
        if token in self.eos_ids:
            reason = "stop"
        elif request.stop:
            text = self.tokenizer.decode(active.tokens, skip_special_tokens=True)
            hits = [text.index(s) for s in request.stop if s in text]
            if hits:
                text, reason = text[: min(hits)], "stop"
        if reason is None and (len(active.tokens) >= request.max_tokens
                               or len(request.prompt) + len(active.tokens) >= self.max_length):
            reason = "length"
        if reason is None:
            return
        if text is None and self.tokenizer is not None:
            text = self.tokenizer.decode(active.tokens, skip_special_tokens=True)
        self._active[slot] = None
        self.bank.unpin(active.ref)
        active.future.set_result(Completion(active.tokens, text, reason, len(request.prompt),
                                            active.logprobs if request.logprobs is not None else None,
                                            active.prompt_logprobs))

    def _drop(self, slot: int, error: BaseException) -> None:
        """Frees the slot of a request that ends without a Completion (cancelled, or its callback failed)."""
        active, self._active[slot] = self._active[slot], None
        self.bank.unpin(active.ref)
        if not active.future.done():
            active.future.set_exception(error)

    def step(self) -> bool:
        """Drops cancelled rows, admits queued requests into free slots, then one decode step; False when idle."""
        with self._cond:
            doomed, self._doomed = self._doomed, set()
        for i, a in enumerate(self._active):
            if a is not None and a.future in doomed:
                self._drop(i, concurrent.futures.CancelledError())
        self._admit()
        live = [i for i, a in enumerate(self._active) if a is not None]
        if not live:
            return False
        structure, arrays = self.bank.snapshot()
        decoder = BankDecoder(self.model, structure)
        rows = rows_for(structure, [a.ref if a else None for a in self._active])
        settings = [(a.request.temperature == 0, a.seed, len(a.tokens), a.request.temperature, a.request.top_p)
                    if a else (True, 0, 0, 0.0, 1.0) for a in self._active]
        greedy, seeds, steps, temperature, top_p = (np.asarray(c) for c in zip(*settings))
        want = any(a is not None and a.request.logprobs is not None for a in self._active)
        try:
            live_mask = np.asarray([a is not None for a in self._active])
            tokens, self._cache, lp = self._decode_jit(
                decoder, want, arrays, self._cache, self._next.copy(), rows, live_mask,
                greedy, seeds.astype(np.uint32), steps.astype(np.int32), temperature.astype(np.float32),
                top_p.astype(np.float32))
            tokens, lp = np.asarray(tokens), jax.tree.map(np.asarray, lp)
        except Exception as e:  # noqa: BLE001 (fail the rows in flight, keep serving)
            for i in live:
                self.bank.unpin(self._active[i].ref)
                self._active[i].future.set_exception(e)
                self._active[i] = None
            self._cache = {**self.model.init_cache(self.slots, self.max_length),
                           "index": jnp.zeros((self.slots,), jnp.int32)}
            return True
        self.steps += 1
        for i in live:
            self._emit(i, int(tokens[i]), None if lp is None else tuple(x[i] for x in lp))
        return True

    def warmup(self, logprobs: bool = False) -> dict:
        """Compiles every prefill shape and the decode step for the bank's current structure (with
        `logprobs`, their logprob variants too) on a scratch cache, so no request waits for a
        compile; safe while serving. Returns `compiles` afterwards."""
        structure, arrays = self.bank.snapshot()
        decoder = BankDecoder(self.model, structure)
        cache = {**self.model.init_cache(self.slots, self.max_length), "index": jnp.zeros((self.slots,), jnp.int32)}
        for want in (False, True) if logprobs else (False,):
            for bucket in self.buckets:
                for size in self.prefill_sizes[bucket]:
                    ones = np.ones((size,), np.int32)
                    _, cache, _ = self._prefill_jit(
                        decoder, want, arrays, cache, np.full((size,), self.slots, np.int32),
                        np.zeros((size, bucket), np.int32), ones, rows_for(structure, [None] * size),
                        np.ones((size,), bool), ones.astype(np.uint32), ones.astype(np.float32),
                        ones.astype(np.float32))
            n = self.slots
            _, cache, _ = self._decode_jit(
                decoder, want, arrays, cache, np.zeros((n,), np.int32), rows_for(structure, [None] * n),
                np.zeros((n,), bool), np.ones((n,), bool), np.zeros((n,), np.uint32), np.zeros((n,), np.int32),
                np.ones((n,), np.float32), np.ones((n,), np.float32))
        jax.block_until_ready(cache)
        return dict(self.compiles)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._queue and all(a is None for a in self._active):
                    self._cond.wait(timeout=1.0)
                if self._stopping:
                    return
            self.step()

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="vera-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify()
            self._thread.join(timeout)
            self._thread = None

    def stats(self) -> dict:
        return {"slots": self.slots, "max_length": self.max_length, "active": sum(a is not None for a in self._active),
                "queued": len(self._queue), "steps": self.steps, "generated_tokens": self.generated,
                "compiles": dict(self.compiles), "prefill_buckets": list(self.buckets),
                "prefill_batch": max(s[-1] for s in self.prefill_sizes.values()),
                "prefill_rows": dict(self.prefill_rows)}
