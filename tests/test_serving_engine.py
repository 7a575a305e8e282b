"""Continuous batching: requests join and leave between steps, prompts are prefilled together, outputs equal
each request run alone, the compiled shapes stay fixed however many requests come, and logprobs equal the
model's own."""

import concurrent.futures

import jax
import numpy as np
import pytest
from _serving_tiny import EOS, alone, random_vera, tiny, word_tokenizer

import vera_jax
from vera_jax.models import generate
from vera_jax.serving import BASE, AdapterBank, Engine, Request, RequestError, TokenLogprob

ADAPTERS = {"a": (("query", "value"), 0, 8), "b": (("value",), 3, 8), "c": (("query", "value"), 0, 4)}


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
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
    bound = sum(len(engine.prefill_sizes[b]) for b in (8, 16))                  # prompts reach bucket 16
    assert engine.compiles["decode"] == 1 and engine.compiles["prefill"] <= bound
    assert max(engine.prefill_rows) > 1                                        # prompts were prefilled together
    engine.generate(requests(10, seed=1))                                      # new lengths, adapters, orders
    assert engine.compiles["decode"] == 1 and engine.compiles["prefill"] <= bound


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
    with pytest.raises(RequestError, match="logprobs: 21; expected an integer from 0 to 20"):
        engine.submit(Request([5, 6], logprobs=21))
    with pytest.raises(RequestError, match="max_tokens: 0; expected an integer >= 1 \\(0 only with prompt_logprobs"):
        engine.submit(Request([5, 6], max_tokens=0))


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


def test_batched_prefill_is_token_identical_to_one_prompt_at_a_time(setup):
    model, params, adapters, engine = setup
    one = Engine(model, engine.bank, slots=3, max_length=32, eos_ids=[EOS], prefill_buckets=(8, 16, 32),
                 prefill_batch=1)
    batch = requests(6, seed=3) + [Request([5, 6, 7], "b", max_tokens=4, temperature=0.9, seed=7)]
    together = engine.generate(batch)
    alone_ = one.generate(batch)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone_]
    assert set(one.prefill_rows) == {1} and max(engine.prefill_rows) > 1


def test_compiled_shapes_stay_bounded_over_every_prompt_length(setup):
    model, params, adapters, engine = setup
    if model.__class__.__name__.lower().startswith("llama"):
        pytest.skip("one family shows it; the compiles do not depend on the family")
    small = Engine(model, engine.bank, slots=4, max_length=32, prefill_buckets=(8, 16, 32))
    counts = small.warmup()
    shapes = sum(len(small.prefill_sizes[b]) for b in small.buckets)
    assert small.prefill_sizes == {8: (1, 2, 4), 16: (1, 2, 4), 32: (1, 2, 4)}
    assert counts == {"prefill": shapes, "decode": 1}
    names = [BASE, *ADAPTERS]
    batch = [Request(list(range(3, 3 + n)), names[n % 4], max_tokens=min(2, 32 - n)) for n in range(1, 32)]
    done = small.generate(batch)
    assert [len(c.token_ids) for c in done] == [r.max_tokens for r in batch]
    assert dict(small.compiles) == counts


def direct_logprobs(model, params, ids):
    """log-softmax of the model's logits over `ids` (1, n), from one plain forward."""
    return np.asarray(jax.nn.log_softmax(model.apply({"params": params}, np.asarray([ids]))[0].astype(np.float32)))


@pytest.mark.parametrize("name", [BASE, "a"])
def test_prompt_and_token_logprobs_equal_the_models_log_softmax(setup, name):
    model, params, adapters, engine = setup
    prompt = [5, 17, 33, 8, 41, 9]
    echo = engine.generate([Request(prompt, name, max_tokens=0, prompt_logprobs=3, logprobs=3)])[0]
    assert echo.token_ids == [] and echo.logprobs == [] and echo.prompt_logprobs[0] is None
    done = engine.generate([Request(prompt, name, max_tokens=4, logprobs=2, prompt_logprobs=0)])[0]
    full = prompt + done.token_ids
    lp = direct_logprobs(model, merged(params, adapters, name), full)
    for j, entry in enumerate(echo.prompt_logprobs[1:], start=1):
        assert entry.token == prompt[j]
        np.testing.assert_allclose(entry.logprob, lp[j - 1, prompt[j]], atol=1e-5)
        assert [t for t, _ in entry.top] == np.argsort(-lp[j - 1])[:3].tolist()
        np.testing.assert_allclose([v for _, v in entry.top], np.sort(lp[j - 1])[::-1][:3], atol=1e-5)
    assert all(e.top == () for e in done.prompt_logprobs[1:])
    assert [e.logprob for e in done.prompt_logprobs[1:]] == [e.logprob for e in echo.prompt_logprobs[1:]]
    assert [e.token for e in done.logprobs] == done.token_ids
    for i, entry in enumerate(done.logprobs):
        row = lp[len(prompt) - 1 + i]
        np.testing.assert_allclose(entry.logprob, row[entry.token], atol=1e-5)
        assert entry.top[0][0] == entry.token and len(entry.top) == 2          # greedy: the token is the best
        assert isinstance(entry, TokenLogprob)


def test_sampled_token_logprobs_are_of_the_raw_logits_not_the_warped_ones(setup):
    model, params, adapters, engine = setup
    req = Request([5, 6, 7], "c", max_tokens=3, temperature=2.5, top_p=0.5, seed=11, logprobs=1)
    done = engine.generate([req])[0]
    assert done.token_ids == engine.generate([Request(**{**req.__dict__, "logprobs": None})])[0].token_ids
    lp = direct_logprobs(model, merged(params, adapters, "c"), req.prompt + done.token_ids)
    for i, entry in enumerate(done.logprobs):
        np.testing.assert_allclose(entry.logprob, lp[len(req.prompt) - 1 + i, entry.token], atol=1e-5)
