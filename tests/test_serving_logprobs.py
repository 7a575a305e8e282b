"""Logprobs through HTTP as OpenAI defines them, checked with the official client against the model's own
log-softmax: completions' legacy format with echo (also max_tokens 0), chat's format, and the limits."""

import jax
import numpy as np
import pytest
from _serving_tiny import live_server, random_vera, tiny, word_tokenizer

import vera_jax
from vera_jax.serving import AdapterBank, Engine
from vera_jax.serving.server import create_app

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served():
    """(openai client, model, {name: params}) of an in-process server over the tiny LLaMA with adapter 'a'."""
    model, params, hf_config = tiny("llama")
    adapted = random_vera(params, ("query", "value"), 0, 8, key=7)
    bank = AdapterBank(params, hf_config)
    bank.add("a", adapted)
    engine = Engine(model, bank, slots=2, max_length=32, tokenizer=word_tokenizer())
    with live_server(create_app(engine, bank)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield client, model, {"base": params, "a": vera_jax.merge(adapted)}


def log_softmax(model, params, ids):
    return np.asarray(jax.nn.log_softmax(model.apply({"params": params}, np.asarray([ids]))[0].astype(np.float32)))


def word(i):
    return word_tokenizer().convert_ids_to_tokens(int(i))


@pytest.mark.parametrize("name", ["base", "a"])
def test_echo_logprobs_equal_the_models_log_softmax(served, name):
    client, model, params = served
    prompt = [5, 17, 33, 8, 41]
    out = client.completions.create(model=name, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    choice = out.choices[0]
    lp = log_softmax(model, params[name], prompt)
    assert choice.text == " ".join(word(i) for i in prompt) and choice.finish_reason == "length"
    assert choice.logprobs.tokens == [word(i) for i in prompt]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], [lp[j - 1, prompt[j]] for j in range(1, 5)],
                               atol=1e-5)
    for j in range(1, 5):
        top = choice.logprobs.top_logprobs[j]
        best = np.argsort(-lp[j - 1])[:3]
        assert {word(t) for t in best} | {word(prompt[j])} == set(top)     # the 3 best and the token itself
        np.testing.assert_allclose([top[word(t)] for t in best], lp[j - 1, best], atol=1e-5)
    assert choice.logprobs.text_offset == [0, 3, 7, 11, 14]
    assert out.usage.completion_tokens == 0


def test_generated_logprobs_follow_the_echoed_prompt(served):
    client, model, params = served
    prompt = [9, 10, 11]
    out = client.completions.create(model="a", prompt=[prompt], max_tokens=3, echo=True, logprobs=1, temperature=0)
    choice = out.choices[0]
    generated = choice.model_extra["token_ids"]
    lp = log_softmax(model, params["a"], prompt + generated)
    assert len(choice.logprobs.token_logprobs) == len(prompt) + len(generated)
    expected = [lp[j - 1, t] for j, t in enumerate(prompt + generated) if j]
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], expected, atol=1e-5)
    greedy = all(tok == max(top.values()) for tok, top in zip(choice.logprobs.token_logprobs[len(prompt):],
                                                              choice.logprobs.top_logprobs[len(prompt):]))
    assert greedy                                       # lm-eval's is_greedy test, on a greedy generation
    assert choice.text.startswith("w9 w10 w11")
    plain = client.completions.create(model="a", prompt=prompt, max_tokens=3, logprobs=0, temperature=0).choices[0]
    np.testing.assert_allclose(plain.logprobs.token_logprobs, expected[len(prompt) - 1:], atol=1e-6)
    assert plain.logprobs.top_logprobs == [{word(t): v} for t, v in zip(generated, plain.logprobs.token_logprobs)]


def test_chat_logprobs_and_top_logprobs(served):
    client, model, params = served
    tok = word_tokenizer()
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    out = client.chat.completions.create(model="a", messages=messages, max_tokens=3, temperature=0, logprobs=True,
                                         top_logprobs=4)
    content = out.choices[0].logprobs.content
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    generated = out.choices[0].model_extra["token_ids"]
    lp = log_softmax(model, params["a"], ids + generated)
    assert [c.token for c in content] == [tok.decode([t]) for t in generated]
    for i, c in enumerate(content):
        row = lp[len(ids) - 1 + i]
        np.testing.assert_allclose(c.logprob, row[generated[i]], atol=1e-5)
        assert c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 4
        assert [t.token for t in c.top_logprobs] == [tok.decode([t]) for t in np.argsort(-row)[:4]]
    plain = client.chat.completions.create(model="a", messages=messages, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == out.choices[0].message.content


@pytest.mark.parametrize("body, param", [
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 1, "stream": True}, "logprobs"),
    ({"echo": True, "stream": True}, "echo"),
])
def test_completion_logprob_limits_are_400_naming_the_param(served, body, param):
    client = served[0]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="base", prompt=[5, 6], **body)
    assert info.value.status_code == 400 and info.value.body["param"] == param
    if param == "logprobs" and "stream" not in body:
        assert "expected 0 to 5" in info.value.body["message"]


@pytest.mark.parametrize("body, param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "stream": True}, "logprobs"),
])
def test_chat_logprob_limits_are_400_naming_the_param(served, body, param):
    client = served[0]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "w5"}], **body)
    assert info.value.status_code == 400 and info.value.body["param"] == param
