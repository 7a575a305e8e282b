"""The OpenAI-compatible server, started by its CLI on 127.0.0.1 and driven by the official
`openai` client: a concurrent burst over 3 adapters and the base equals each merged alone, and
streamed answers concatenate to the unstreamed ones."""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from _serving_tiny import EOS, alone, random_vera, save_checkpoint, tiny, word_tokenizer

import vera_jax
from vera_jax.interop import save_peft_adapter
from vera_jax.serving import BASE
from vera_jax.serving.server import TextStream

openai = pytest.importorskip("openai")
ADAPTERS = {"a": (("query", "value"), 0, 8), "b": (("value",), 3, 8), "c": (("query", "value"), 5, 4),
            "late": (("key", "value"), 0, 8)}
MAX_LENGTH = 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, model, params, adapters, root); the server process is stopped afterwards."""
    root = tmp_path_factory.mktemp("serving")
    model, params, hf_config = tiny("llama")
    save_checkpoint(root / "ckpt", "llama", params, hf_config)
    adapters = {}
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        adapters[name] = random_vera(params, *spec, key=30 + i)
        if name == "c":
            save_peft_adapter(root / name, adapters[name], hf_config)
        else:
            vera_jax.save_adapter(root / name, adapters[name])
    port = free_port()
    cmd = [sys.executable, "-m", "vera_jax.serving", "--checkpoint", str(root / "ckpt"), "--host", "127.0.0.1",
           "--port", str(port), "--slots", "4", "--max-length", str(MAX_LENGTH), "--max-tokens", "5",
           "--adapter-root", str(root)]
    for name in ("a", "b", "c"):
        cmd += ["--adapter", f"{name}={root / name}"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}: {(root / 'server.log').read_text()[-3000:]}")
            try:
                # the line is printed by a thread polling uvicorn's `started`, so /health may answer first
                if (httpx.get(f"{url}/health", timeout=2).status_code == 200
                        and f"listening on {url}\n" in (root / "server.log").read_text()):
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server not up in 240 s: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url, model, params, adapters, root
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=180)


def reference(model, params, adapters, name, ids, max_tokens):
    return alone(model, params if name == BASE else vera_jax.merge(adapters[name]), ids, max_tokens)


def test_models_lists_the_base_and_every_adapter(server):
    url = server[0]
    listed = {m.id: m for m in client(url).models.list().data}
    assert set(listed) == {BASE, "a", "b", "c"}
    assert listed["a"].model_extra["bytes"] == 2 * (8 + 32) * 4 + 2 * (8 + 16) * 4   # query 32 wide, value 16


def test_concurrent_burst_is_token_identical_to_each_adapter_merged_alone(server):
    url, model, params, adapters, _ = server
    rng = np.random.RandomState(0)
    names = [BASE, "a", "b", "c"] * 4
    jobs = [(name, rng.randint(3, 100, rng.randint(2, 10)).tolist(), int(rng.randint(2, 8))) for name in names]
    api = client(url)

    def ask(job):
        name, ids, max_tokens = job
        prompt = ids if len(ids) % 2 else " ".join(f"w{t}" for t in ids)     # token ids or text
        return api.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    tok = word_tokenizer()
    for (name, ids, max_tokens), answer in zip(jobs, answers):
        expected = reference(model, params, adapters, name, ids, max_tokens)
        choice = answer.choices[0]
        assert choice.model_extra["token_ids"] == expected, (name, ids)
        assert choice.text == tok.decode(expected, skip_special_tokens=True)
        assert answer.model == name and answer.usage.prompt_tokens == len(ids)


def test_chat_completion_uses_the_tokenizers_chat_template(server):
    url, model, params, adapters, _ = server
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    ids = word_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    answer = client(url).chat.completions.create(model="b", messages=messages, max_tokens=4, temperature=0)
    assert answer.choices[0].model_extra["token_ids"] == reference(model, params, adapters, "b", ids, 4)
    assert answer.choices[0].message.role == "assistant"


def test_bad_requests_get_errors_naming_the_problem_and_the_server_stays_up(server):
    url, *_ , root = server
    api = client(url)
    with pytest.raises(openai.NotFoundError, match="known: \\['base', 'a', 'b', 'c'\\]"):
        api.completions.create(model="nope", prompt=[5, 6], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="prompt: 46 tokens \\+ max_tokens 5 exceed the context of 48"):
        api.completions.create(model="a", prompt=list(range(3, 49)), max_tokens=5)
    bad_json = httpx.post(f"{url}/v1/completions", content=b'{"model": "a", "prompt": [5,', timeout=30,
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "malformed JSON" in bad_json.json()["error"]["message"]
    bad_field = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": [5], "max_tokens": "many"},
                           timeout=30)
    assert bad_field.status_code == 422 and bad_field.json()["error"]["param"] == "max_tokens"
    missing = httpx.post(f"{url}/v1/chat/completions", json={"model": "a"}, timeout=30)
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "messages"
    params = tiny("llama")[1]
    vera_jax.save_adapter(root / "lora", vera_jax.apply_lora(params, vera_jax.LoraConfig(r=2, targets=("value",))))
    refused = httpx.post(f"{url}/v1/adapters", json={"name": "lora", "path": str(root / "lora")}, timeout=60)
    assert refused.status_code == 400 and "method 'lora' is refused" in refused.json()["error"]["message"]
    nowhere = httpx.post(f"{url}/v1/adapters", json={"name": "x", "path": str(root / "missing")}, timeout=60)
    assert nowhere.status_code == 400 and "not an adapter directory" in nowhere.json()["error"]["message"]
    assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
    assert api.completions.create(model="a", prompt=[5, 6], max_tokens=2, temperature=0).choices[0].text


def test_adapters_load_and_unload_at_run_time(server):
    url, model, params, adapters, root = server
    api = client(url)
    loaded = httpx.post(f"{url}/v1/adapters", json={"name": "late", "path": str(root / "late")}, timeout=120)
    assert loaded.status_code == 200 and loaded.json()["name"] == "late"
    assert "late" in {m.id for m in api.models.list().data}
    answer = api.completions.create(model="late", prompt=[9, 10, 11], max_tokens=5, temperature=0)
    assert answer.choices[0].model_extra["token_ids"] == reference(model, params, adapters, "late", [9, 10, 11], 5)
    assert httpx.delete(f"{url}/v1/adapters/late", timeout=30).status_code == 200
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="late", prompt=[9], max_tokens=2)
    assert httpx.delete(f"{url}/v1/adapters/late", timeout=30).status_code == 404


def test_streamed_completions_and_chat_concatenate_to_the_unstreamed_answers(server):
    url = server[0]
    api = client(url)
    for name in (BASE, "a", "b"):
        usage = {"stream_options": {"include_usage": True}} if name == "a" else {}
        ask = {"model": name, "prompt": "w5 w9 w14", "max_tokens": 8, "temperature": 0}
        whole = api.completions.create(**ask)
        chunks = list(api.completions.create(**ask, stream=True, **usage))
        texts = [c for c in chunks if c.choices]
        assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
        assert "".join(c.choices[0].text for c in texts) == whole.choices[0].text, name
        assert sum((c.choices[0].model_extra["token_ids"] for c in texts), []) == whole.choices[0].model_extra[
            "token_ids"]
        assert [c.choices[0].finish_reason for c in texts] == [None] * (len(texts) - 1) + [
            whole.choices[0].finish_reason]
        assert (chunks[-1].usage == whole.usage and not chunks[-1].choices) if usage else chunks[-1].usage is None

        messages = [{"role": "user", "content": f"w{7 + len(name)} w6"}]
        whole = api.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0)
        chunks = list(api.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0,
                                                  stream=True, **usage))
        texts = [c for c in chunks if c.choices]
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert texts[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in texts) == whole.choices[0].message.content, name
        assert texts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in texts[:-1])
        assert (chunks[-1].usage == whole.usage and not chunks[-1].choices) if usage else chunks[-1].usage is None


def test_the_raw_stream_is_server_sent_events_ending_in_done(server):
    url = server[0]
    body = {"model": "c", "prompt": [[5, 6, 7], [9, 10]], "max_tokens": 4, "temperature": 0}
    whole = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    for i in (0, 1):                                # two prompts: choices by index, interleaved as generated
        mine = [c for chunk in chunks for c in chunk["choices"] if c["index"] == i]
        assert "".join(c["text"] for c in mine) == whole["choices"][i]["text"]
        assert [c["finish_reason"] for c in mine][-1] == whole["choices"][i]["finish_reason"]


def test_a_stop_string_is_never_streamed_even_in_part(server):
    url = server[0]
    api = client(url)
    for first in range(5, 40):                      # a prompt whose 4 greedy words are distinct and not EOS
        ids = api.completions.create(model="a", prompt=[first, 9], max_tokens=4, temperature=0).choices[0].model_extra[
            "token_ids"]
        if len(ids) == 4 and len(set(ids)) == 4 and EOS not in ids:
            break
    else:
        pytest.fail("no prompt with 4 distinct words")
    words = [f"w{t}" for t in ids]
    unused = next(f"w{t}" for t in range(3, 100) if f"w{t}" not in words)
    for stop, text, reason in ((f"{words[1]} {words[2]}", f"{words[0]} ", "stop"),       # held back, then cut
                               (f"{words[1]} {unused}", " ".join(words), "length")):    # held back, then sent
        ask = {"model": "a", "prompt": [first, 9], "max_tokens": 4, "temperature": 0, "stop": stop}
        whole = api.completions.create(**ask).choices[0]
        assert (whole.text, whole.finish_reason) == (text, reason)
        deltas = [c.choices[0].text for c in api.completions.create(**ask, stream=True)]
        assert "".join(deltas) == text              # deltas only append: no part of a stop was ever sent


def test_text_deltas_hold_back_split_characters_and_stop_prefixes():
    class Bytes:                                    # a byte-level tokenizer: one token per UTF-8 byte
        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    text = "naïve 世界 🙂 end"
    for stop, final in (((), text), (("界 🙂 x",), text), (("🙂",), "naïve 世界 "), (("世界",), "naïve ")):
        stream, sent = TextStream(Bytes(), stop), ""
        for byte in text.encode():                 # the engine would stop at the stop string; keep pushing anyway
            sent += stream.push([byte])
            assert "\ufffd" not in sent and final.startswith(sent), (stop, sent)
            assert not any(sent.endswith(s[:j]) for s in stop for j in range(1, len(s))), (stop, sent)
        assert sent == final and stream.finish(final) == ""


def test_streamed_requests_are_refused_before_the_stream_as_json(server):
    url = server[0]
    api = client(url)
    with pytest.raises(openai.NotFoundError, match="known: \\['base', 'a', 'b', 'c'\\]"):
        api.completions.create(model="nope", prompt=[5, 6], max_tokens=2, stream=True)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "w5"}], stream=True)
    with pytest.raises(openai.BadRequestError, match="exceed the context of 48"):
        api.completions.create(model="a", prompt=list(range(3, 49)), max_tokens=5, stream=True)
    bad = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": [5], "stream": True, "top_p": 0},
                     timeout=30)
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/json"
    assert bad.json()["error"]["param"] == "top_p"


def test_a_client_that_goes_away_frees_its_slot(server):
    url = server[0]
    body = {"model": "b", "prompt": [5, 6], "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        next(response.iter_lines())                 # the first event, then hang up
    deadline = time.time() + 60
    while httpx.get(f"{url}/health", timeout=30).json()["engine"]["active"]:
        assert time.time() < deadline, "the slot was never freed"
        time.sleep(0.2)
    again = list(client(url).completions.create(model="b", prompt=[5, 6], max_tokens=3, temperature=0, stream=True))
    assert again[-1].choices[0].finish_reason in ("stop", "length")
