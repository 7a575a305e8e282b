"""Continuous batching over an adapter bank: a fixed number of slots, requests join and leave
between decode steps.

Each slot owns one row of a KV cache of `max_length` positions whose write index is per row
(`decoding.update_cache` with a (slots,) index), so slots sit at different lengths. A request
joins a free slot by a batch-1 prefill of its prompt, right-padded to a bucket, written into the
slot's first positions; every engine step then runs ONE decode call over all slots, each row with
its own adapter (`BankDecoder` rows), sampling settings, seed and step. Rows leave on EOS, a stop
string, `max_tokens` or the end of the context; their slot is reused at the next step.

Compiled shapes (never one per request): one decode step for (slots, 1) tokens, and one prefill
per prompt bucket (`prefill_buckets`, default powers of two from 16 up to `max_length`), for the
current bank structure. A bank change that adds a group or a layer, or doubles a group's capacity,
retraces once; loading an adapter into free capacity does not. `compiles` counts every trace.

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
from vera_jax.serving.bank import BASE, AdapterBank, AdapterUnloaded, rows_for
from vera_jax.serving.batched import BankDecoder


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
    version: int | None = None        # the adapter version it runs on; `submit` binds the current one


@dataclasses.dataclass
class Completion:
    token_ids: list[int]
    text: str | None
    finish_reason: str                # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int


@dataclasses.dataclass
class _Active:
    request: Request
    future: concurrent.futures.Future
    ref: tuple | None
    seed: int
    on_token: Callable[[int], None] | None = None
    tokens: list = dataclasses.field(default_factory=list)


def _choose(logits, greedy, seeds, steps, temperature, top_p):
    """Per row: argmax where greedy, else a seeded top-p draw (as sampling.sample_tokens)."""
    safe_t = jnp.where(greedy, 1.0, temperature)
    drawn = sampling.sample_tokens(logits, seeds, steps, safe_t, 0, top_p)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), drawn)


class Engine:
    """Slots, a request queue and a background loop (`start` / `stop`); `submit` is thread-safe.

    model: the linen causal LM; bank: its `AdapterBank`; tokenizer: decodes text for stop strings
    and `Completion.text` (None: token ids only, no stop strings); eos_ids: tokens that end a row
    (default: the tokenizer's eos_token_id).
    """

    def __init__(self, model, bank: AdapterBank, *, slots: int = 8, max_length: int = 256, tokenizer=None,
                 eos_ids=None, prefill_buckets: tuple[int, ...] | None = None):
        if slots < 1 or max_length < 2:
            raise ValueError(f"slots: {slots}, max_length: {max_length}; expected slots >= 1, max_length >= 2")
        self.model, self.bank, self.tokenizer = model, bank, tokenizer
        self.slots, self.max_length = slots, max_length
        if eos_ids is None and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_ids = [tokenizer.eos_token_id]
        self.eos_ids = frozenset(int(e) for e in (eos_ids or ()))
        if prefill_buckets is None:
            prefill_buckets = tuple(sorted({min(2**k, max_length) for k in range(4, max_length.bit_length() + 1)}))
        if max(prefill_buckets) < max_length - 1 or min(prefill_buckets) < 1 or max(prefill_buckets) > max_length:
            raise ValueError(f"prefill_buckets: {prefill_buckets}; they must lie in [1, {max_length}] and reach "
                             f"{max_length - 1}")
        self.buckets = tuple(sorted(prefill_buckets))
        self.compiles = collections.Counter()       # "decode" / "prefill" -> traces
        self._decode_jit = jax.jit(self._decode_step, static_argnums=(0,), donate_argnums=(2,))
        self._prefill_jit = jax.jit(self._prefill, static_argnums=(0,), donate_argnums=(2,))
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
    def _decode_step(self, decoder, arrays, cache, tokens, rows, active, greedy, seeds, steps, temperature, top_p):
        self.compiles["decode"] += 1
        mask = jnp.ones((tokens.shape[0], self.max_length), jnp.int32)
        logits, cache = decoder.apply(arrays, tokens[:, None], mask, cache, rows)
        cache["index"] = jnp.where(active, cache["index"], 0)
        return _choose(logits[:, 0].astype(jnp.float32), greedy, seeds, steps, temperature, top_p), cache

    def _prefill(self, decoder, arrays, cache, slot, prompt, length, rows, greedy, seed, temperature, top_p):
        self.compiles["prefill"] += 1
        bucket = prompt.shape[1]
        small = decoder.init_cache(1, bucket)
        small = {**small, "index": jnp.zeros((1,), jnp.int32)}
        logits, small = decoder.apply(arrays, prompt, jnp.ones((1, bucket), jnp.int32), small, rows)
        last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=True).astype(jnp.float32)
        token = _choose(last, greedy[None], seed[None], jnp.zeros((1,), jnp.int32), temperature[None], top_p[None])
        out = {"index": cache["index"].at[slot].set(length)}
        for name, layer in cache.items():
            if name != "index":
                out[name] = {k: jax.lax.dynamic_update_slice(v, small[name][k], (slot, 0, 0, 0))
                             for k, v in layer.items()}
        return token[0], out

    # ------------------------------------------------------------------------------ requests
    def check(self, request: Request) -> None:
        """Raises RequestError (naming the field) or KeyError (unknown model) before queueing."""
        n = len(request.prompt)
        if n == 0:
            raise RequestError("prompt: empty; at least one token is needed")
        if not isinstance(request.max_tokens, int) or request.max_tokens < 1:
            raise RequestError(f"max_tokens: {request.max_tokens!r}; expected an integer >= 1")
        if n + request.max_tokens > self.max_length:
            raise RequestError(f"prompt: {n} tokens + max_tokens {request.max_tokens} exceed the context of "
                               f"{self.max_length} tokens")
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
        while True:
            with self._cond:
                free = [i for i, a in enumerate(self._active) if a is None]
                if not free or not self._queue:
                    return
                request, future, on_token = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                ref = self.bank.pin(request.model, request.version)
            except KeyError as e:                      # unloaded while queued
                future.set_exception(e)
                continue
            structure, arrays = self.bank.snapshot()      # after pin: holds this adapter's row
            decoder = BankDecoder(self.model, structure)
            slot = free[0]
            seed = secrets.randbelow(2**32) if request.seed is None else request.seed
            active = _Active(request, future, ref, seed, on_token)
            try:
                n = len(request.prompt)
                bucket = next(b for b in self.buckets if b >= n)
                prompt = np.zeros((1, bucket), np.int32)
                prompt[0, :n] = request.prompt
                token, self._cache = self._prefill_jit(
                    decoder, arrays, self._cache, np.int32(slot), prompt, np.int32(n), rows_for(structure, [ref]),
                    np.bool_(request.temperature == 0), np.uint32(seed), np.float32(request.temperature),
                    np.float32(request.top_p))
            except Exception as e:  # noqa: BLE001 (a failing request never stops the engine)
                self.bank.unpin(ref)
                future.set_exception(e)
                continue
            self._active[slot] = active
            self._emit(slot, int(token))

    def _emit(self, slot: int, token: int) -> None:
        """Appends a token to the slot's request; finishes it on EOS, stop string or length."""
        active = self._active[slot]
        active.tokens.append(token)
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
        active.future.set_result(Completion(active.tokens, text, reason, len(request.prompt)))

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
        try:
            live_mask = np.asarray([a is not None for a in self._active])
            tokens, self._cache = self._decode_jit(
                decoder, arrays, self._cache, self._next.copy(), rows, live_mask,
                greedy, seeds.astype(np.uint32), steps.astype(np.int32), temperature.astype(np.float32),
                top_p.astype(np.float32))
            tokens = np.asarray(tokens)
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
            self._emit(i, int(tokens[i]))
        return True

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
                "compiles": dict(self.compiles), "prefill_buckets": list(self.buckets)}
