"""Continuous batching: requests join and leave between steps, outputs equal each request run alone,
and the compiled shapes stay fixed however many requests come."""

import concurrent.futures

import numpy as np
import pytest
from _serving_tiny import EOS, alone, random_vera, tiny, word_tokenizer

import vera_jax
from vera_jax.models import generate
from vera_jax.serving import BASE, AdapterBank
from vera_jax.serving.engine import Engine, Request, RequestError

ADAPTERS = {"a": (("query", "value"), 0, 8), "b": (("value",), 3, 8), "c": (("query", "value"), 0, 4)}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    model, params, _ = tiny(request.param)
    bank = AdapterBank(params)
    adapters = {}
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        adapters[name] = random_vera(params, *spec, key=20 + i)
        bank.add(name, adapters[name])
    engine = Engine(model, bank, slots=3, max_length=32, tokenizer=word_tokenizer(), prefill_buckets=(8, 16, 32))
    return model, params, adapters, engine


def merged(params, adapters, name):
    return params if name == BASE else vera_jax.merge(adapters[name])


def requests(n, seed=0):
    """n greedy requests cycling over the adapters and the base, prompt lengths 2-12, max_tokens 3-9."""
    rng = np.random.RandomState(seed)
    names = [BASE, *ADAPTERS]
    return [Request(prompt=rng.randint(3, 100, rng.randint(2, 13)).tolist(), model=names[i % len(names)],
                    max_tokens=int(rng.randint(3, 10))) for i in range(n)]


def test_more_requests_than_slots_each_equal_to_its_adapter_merged_alone(setup):
    model, params, adapters, engine = setup
    batch = requests(8)
    done = engine.generate(batch)
    for request, completion in zip(batch, done):
        expected = alone(model, merged(params, adapters, request.model), request.prompt, request.max_tokens)
        assert completion.token_ids == expected, request
        assert completion.finish_reason == ("stop" if expected[-1] == EOS else "length")
        assert completion.prompt_tokens == len(request.prompt)
        assert completion.text == word_tokenizer().decode(expected, skip_special_tokens=True)
    assert engine.compiles["decode"] == 1 and engine.compiles["prefill"] <= 2   # buckets 8 and 16
    before = dict(engine.compiles)
    engine.generate(requests(10, seed=1))                                      # new lengths, adapters, orders
    assert dict(engine.compiles) == before


def test_sampling_depends_only_on_the_request_and_equals_generate_sample(setup):
    model, params, adapters, engine = setup
    req = Request(prompt=[5, 17, 33, 8], model="b", max_tokens=6, temperature=0.8, top_p=0.9, seed=1234)
    together = engine.generate([req, *requests(4, seed=2)])[0].token_ids
    assert engine.generate([req])[0].token_ids == together
    ref = np.asarray(generate.sample(model, merged(params, adapters, "b"), np.asarray([req.prompt]), None, 6, EOS, 1,
                                     seeds=np.array([1234]), temperature=0.8, top_p=0.9))[0].tolist()
    assert together == (ref[: ref.index(EOS) + 1] if EOS in ref else ref)
    other = engine.generate([Request(**{**req.__dict__, "seed": 99})])[0].token_ids
    assert other != together


def test_stop_strings_and_eos_end_a_row(setup):
    model, params, adapters, engine = setup
    prompt = [7, 8, 9, 10]
    full = alone(model, merged(params, adapters, "a"), prompt, 8, eos=-1)
    cut = full.index(EOS) if EOS in full else len(full)
    assert cut >= 2, full
    stop = f"w{full[1]} "                      # the trailing space keeps "w3" from matching "w35"
    got = engine.generate([Request(prompt, "a", max_tokens=8, stop=(stop,))])[0]
    assert got.finish_reason == "stop" and got.token_ids == full[:3] and got.text == f"w{full[0]} "
    ends = engine.generate([Request(prompt, "a", max_tokens=8)])[0]
    assert ends.token_ids == alone(model, merged(params, adapters, "a"), prompt, 8)


def test_bad_requests_name_the_field(setup):
    _, _, _, engine = setup
    with pytest.raises(RequestError, match="prompt: 30 tokens \\+ max_tokens 5 exceed the context of 32"):
        engine.submit(Request(list(range(3, 33)), max_tokens=5))
    with pytest.raises(KeyError, match="known: \\['base', 'a', 'b', 'c'\\]"):
        engine.submit(Request([5], model="nope"))
    for field, value in (("temperature", -1.0), ("top_p", 0.0), ("max_tokens", 0), ("seed", -3)):
        with pytest.raises(RequestError, match=field):
            engine.submit(Request([5, 6], **{field: value}))
    with pytest.raises(RequestError, match="prompt: token ids"):
        engine.submit(Request([5, 1000]))


def test_on_token_hands_over_every_token_before_the_end_and_cancel_frees_the_slot(setup):
    model, params, adapters, engine = setup
    seen = []
    streamed = engine.submit(Request([5, 6, 7], "a", max_tokens=6),
                             on_token=lambda t: seen.append((t, streamed.done())))
    long = engine.submit(Request([5, 6, 7], "b", max_tokens=20))
    other = engine.submit(Request([8, 9], "c", max_tokens=6))
    queued = engine.submit(Request([10, 11], "a", max_tokens=6))        # 3 slots: this one waits
    engine.cancel(queued)
    engine.step()
    engine.step()
    engine.cancel(long)
    engine.step()
    assert engine.stats()["active"] <= 2
    assert isinstance(long.exception(), concurrent.futures.CancelledError)
    while not (streamed.done() and other.done()):
        engine.step()
    assert queued.cancelled() and engine.stats()["active"] == 0
    assert [t for t, _ in seen] == streamed.result().token_ids and not any(done for _, done in seen)
    assert other.result().token_ids == alone(model, merged(params, adapters, "c"), [8, 9], 6)

    def broken(token):
        raise RuntimeError("the client's queue is gone")

    failing = engine.submit(Request([5, 6], "a", max_tokens=4), on_token=broken)
    fine = engine.submit(Request([5, 6], "b", max_tokens=4))
    while not (failing.done() and fine.done()):
        engine.step()
    with pytest.raises(RuntimeError, match="queue is gone"):
        failing.result()
    assert fine.result().token_ids == alone(model, merged(params, adapters, "b"), [5, 6], 4)
