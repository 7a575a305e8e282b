"""The HTTP API as a stranger on the network meets it (DESIGN contract 9): bad input is a 4xx in
OpenAI's error body and never costs another request, requests run on the adapter version they
were admitted with, keys guard /v1, loads stay inside the adapter root, limits hold, and the
server counts what it does. One in-process uvicorn over the tiny LLaMA; the engine loop is
stopped where a test needs requests to wait in the queue."""

import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
import types

import httpx
import jax
import numpy as np
import pytest
from _serving_tiny import live_server, random_vera, tiny, word_tokenizer
from fastapi.testclient import TestClient

import vera_jax
from vera_jax.serving import AdapterBank, AdapterUnloaded, Engine
from vera_jax.serving.server import create_app

KEY = "test-key"
MAX_BODY, MAX_CHARS, MAX_PROMPTS = 20_000, 2_000, 4


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """Namespace(url, engine, bank, root, http) of a running server with adapter 'a' loaded."""
    root = tmp_path_factory.mktemp("api")
    model, params, hf_config = tiny("llama")
    adapters = root / "adapters"
    for name, key in (("a", 1), ("b", 2)):
        vera_jax.save_adapter(adapters / name, random_vera(params, ("query", "value"), 0, 8, key=key))
    nan = random_vera(params, ("value",), 0, 8, key=3)
    leaves, treedef = jax.tree.flatten(nan.adapter)
    leaves[-1] = leaves[-1].at[0].set(np.nan)
    vera_jax.save_adapter(adapters / "nan", nan.replace(adapter=jax.tree.unflatten(treedef, leaves)))
    vera_jax.save_adapter(root / "outside", random_vera(params, ("value",), 0, 8, key=4))
    (adapters / "link").symlink_to(root / "outside", target_is_directory=True)
    (adapters / "empty").mkdir()
    bank = AdapterBank(params, hf_config)
    bank.load("a", adapters / "a")
    engine = Engine(model, bank, slots=2, max_length=32, tokenizer=word_tokenizer())
    app = create_app(engine, bank, default_max_tokens=4, api_key=KEY, adapter_root=adapters,
                     max_body_bytes=MAX_BODY, max_prompt_chars=MAX_CHARS, max_prompts=MAX_PROMPTS)
    with live_server(app) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                                               timeout=120) as http:
        yield types.SimpleNamespace(url=url, engine=engine, bank=bank, root=adapters, http=http, app=app)


def ask(api, **body):
    return api.http.post("/v1/completions", json={"model": "a", "prompt": [5, 6, 7], "max_tokens": 3,
                                                  "temperature": 0, **body})


def error(response, status: int, param=None) -> str:
    """The message of an OpenAI error body with `status` (and `param`)."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == status
    if param is not None:
        assert body["param"] == param, body
    return body["message"]


def wait_until(condition, what: str, seconds: float = 60):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def paused(api):
    """The engine loop stopped (requests stay queued) and restarted afterwards."""
    api.engine.stop()
    try:
        yield api
    finally:
        api.engine.start()


def test_lone_surrogates_are_400_in_prompt_chat_content_prompt_lists_and_stop(api):
    raw = [("prompt", b'{"model": "a", "prompt": "\\ud800 w5"}'),
           ("prompt", b'{"model": "a", "prompt": ["w5", "w6 \\udfff"]}'),
           ("stop", b'{"model": "a", "prompt": [5], "stop": "\\ud800"}'),
           ("model", b'{"model": "\\ud800", "prompt": [5]}')]
    for param, body in raw:
        r = api.http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert "lone surrogate" in error(r, 400, param)
    chat = b'{"model": "a", "messages": [{"role": "user", "content": "w5 \\ud800"}]}'
    r = api.http.post("/v1/chat/completions", content=chat, headers={"content-type": "application/json"})
    assert "lone surrogate" in error(r, 400, "messages")
    assert ask(api).status_code == 200


def test_after_a_500_the_same_keep_alive_connection_still_serves(api, monkeypatch):
    stats = api.engine.stats
    calls = []

    def broken():
        if not calls:
            calls.append(1)
            raise RuntimeError("a bug")
        return stats()

    monkeypatch.setattr(api.engine, "stats", broken)
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        first = http.get("/health")
        assert "internal error (RuntimeError)" in error(first, 500)
        again = http.post("/v1/completions", json={"model": "a", "prompt": [5, 6], "max_tokens": 2})
        assert again.status_code == 200 and len(again.json()["choices"][0]["token_ids"]) == 2


def test_unload_ends_queued_requests_with_404_and_a_reload_is_a_new_version(api, paused):
    http = api.http
    assert http.post("/v1/adapters", json={"name": "x", "path": "b"}).status_code == 200
    old = {m["id"]: m["version"] for m in http.get("/v1/models").json()["data"] if m["id"] != "base"}["x"]
    waiting = {}
    t = threading.Thread(target=lambda: waiting.setdefault("r", ask(api, model="x")))
    t.start()
    with httpx.stream("POST", f"{api.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"model": "x", "prompt": [5, 6], "max_tokens": 3, "stream": True}) as streamed:
        assert streamed.status_code == 200
        wait_until(lambda: api.engine.stats()["queued"] == 2, "both requests queued")
        assert http.delete("/v1/adapters/x").status_code == 200
        reloaded = http.post("/v1/adapters", json={"name": "x", "path": "a"})
        assert reloaded.status_code == 200 and reloaded.json()["version"] != old
        events = [line[len("data: "):] for line in streamed.iter_lines() if line]
    t.join(60)
    assert error(waiting["r"], 404, "model") == "model 'x' was unloaded"
    assert events[-1] == "[DONE]" and json.loads(events[0])["error"]["code"] == 404
    assert "was unloaded" in json.loads(events[0])["error"]["message"] and len(events) == 2
    api.engine.start()
    same = ask(api, model="x").json()["choices"][0]["token_ids"]      # the new x is a's directory
    assert same == ask(api, model="a").json()["choices"][0]["token_ids"]
    assert http.delete("/v1/adapters/x").status_code == 200


def test_a_request_pinned_to_an_unloaded_version_never_runs_on_the_reloaded_name(api):
    bank = api.bank
    first = bank.load("y", api.root / "b").version
    bank.unload("y")
    assert bank.load("y", api.root / "b").version != first
    with pytest.raises(AdapterUnloaded, match="model 'y' was unloaded"):
        bank.pin("y", first)
    bank.unload("y")


def test_an_unstreamed_client_that_disconnects_cancels_its_work(api, paused):
    generated = api.engine.generated
    body = json.dumps({"model": "a", "prompt": [9, 10], "max_tokens": 5}).encode()
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:    # hangs up once the request is queued
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (host.encode(), KEY.encode(), len(body), body))
        wait_until(lambda: api.engine.stats()["queued"] == 1, "the request is queued")
    gone = 'vera_requests_total{adapter="a",route="/v1/completions",status="499"}'
    wait_until(lambda: gone in api.http.get("/metrics").text, "the server never noticed the client left")
    api.engine.start()
    wait_until(lambda: api.engine.stats()["queued"] == 0, "the queue drains")
    assert api.engine.stats()["active"] == 0 and api.engine.generated == generated


def test_limits_on_body_bytes_prompt_characters_and_prompts_per_request(api):
    big = api.http.post("/v1/completions", json={"model": "a", "prompt": "w5 " * (MAX_BODY // 3)})
    assert "--max-body-bytes" in error(big, 413)
    chunked = api.http.post("/v1/completions", content=iter([b'{"model": "a", "prompt": "', b"w5 " * MAX_BODY, b'"}']),
                            headers={"content-type": "application/json"})
    assert "--max-body-bytes" in error(chunked, 413)
    long = ask(api, prompt="w5 " * (MAX_CHARS // 3 + 1))
    assert "--max-prompt-chars" in error(long, 400, "prompt")
    many = ask(api, prompt=[[5, 6]] * (MAX_PROMPTS + 1))
    assert "--max-prompts" in error(many, 400, "prompt")
    assert len(ask(api, prompt=[[5, 6]] * MAX_PROMPTS).json()["choices"]) == MAX_PROMPTS


def test_health_answers_while_a_prompt_is_tokenized(api, monkeypatch):
    tokenizer = api.engine.tokenizer
    started, call = threading.Event(), type(tokenizer).__call__

    def slow(self, *args, **kwargs):                 # a tokenizer as slow as a 10 MB prompt
        started.set()
        time.sleep(5.0)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", slow)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", ask(api, prompt="w5 w6")))
    t.start()
    assert started.wait(30)
    began = time.monotonic()
    assert api.http.get("/health").status_code == 200
    assert time.monotonic() - began < 2.5, "the event loop was blocked by tokenizing"
    t.join(60)
    assert out["r"].status_code == 200


def test_the_api_key_guards_every_v1_route_but_not_health(api):
    routes = [("GET", "/v1/models", None), ("POST", "/v1/completions", {"model": "a", "prompt": [5]}),
              ("POST", "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "w5"}]}),
              ("POST", "/v1/adapters", {"name": "z", "path": "b"}), ("DELETE", "/v1/adapters/a", None),
              ("POST", "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "b"}),
              ("POST", "/v1/unload_lora_adapter", {"lora_name": "a"})]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path, body in routes:
            r = httpx.request(method, f"{api.url}{path}", json=body, headers=headers, timeout=30)
            assert "API key" in error(r, 401), (method, path, headers)
    assert httpx.get(f"{api.url}/health", timeout=30).status_code == 200
    assert "a" in api.bank.names() and "z" not in api.bank.names()


def test_run_time_loads_stay_inside_the_adapter_root_and_say_the_same_for_missing_and_non_adapters(api):
    http, root = api.http, api.root
    refusals = {}
    for path in ("missing", "empty", str(root.parent), "/root", "../outside", "link", str(root / "link"), "a\x00"):
        r = http.post("/v1/adapters", json={"name": "z", "path": path})
        refusals[path] = error(r, 400, "path").replace(repr(path), "PATH")
    assert set(refusals.values()) == {"path: PATH is not an adapter directory under the adapter root"}, refusals
    nan = http.post("/v1/adapters", json={"name": "z", "path": "nan"})
    assert re.search(r"value\S*\.lambda_[db] has NaN or inf values", error(nan, 400, "path"))
    assert str(root) not in nan.text
    closed = create_app(api.engine, api.bank)                     # no adapter root: loading is off
    r = TestClient(closed).post("/v1/adapters", json={"name": "z", "path": str(root / "b")})  # no lifespan
    assert "--adapter-root" in error(r, 403, "path")
    assert "z" not in api.bank.names()


def test_vllm_lora_aliases_load_and_unload(api):
    http = api.http
    loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "v", "lora_path": "b"})
    assert loaded.status_code == 200 and "added successfully" in loaded.text
    assert ask(api, model="v").status_code == 200
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "v"}).status_code == 200
    assert "is not loaded" in error(http.post("/v1/unload_lora_adapter", json={"lora_name": "v"}), 404)


def test_strict_types_chat_roles_and_unsupported_parameters_are_refused(api):
    for field, value in (("max_tokens", 4.0), ("max_tokens", True), ("stream", "yes"), ("seed", 1.5),
                         ("prompt", [True, 5]), ("prompt", [5.0])):
        error(ask(api, **{field: value}), 422, field)
    wizard = api.http.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "wizard",
                                                                                      "content": "w5"}]})
    error(wizard, 422, "messages")
    for field, value in (("best_of", 2), ("presence_penalty", 0.5), ("frequency_penalty", -1.0),
                         ("logit_bias", {"5": 10}), ("suffix", "w9")):
        assert error(ask(api, **{field: value}), 400, field).startswith(f"{field}:")
    assert ask(api, best_of=1, presence_penalty=0.0).status_code == 200


def test_every_error_is_in_openais_body(api):
    http = api.http
    error(http.get("/v1/nothing"), 404)
    error(http.put("/v1/completions", json={}), 405)
    error(http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"}), 400, "body")
    error(http.post("/v1/completions", json=[1, 2]), 422)
    assert error(http.delete("/v1/adapters/base"), 400, "name") == "name: the base model cannot be unloaded"
    assert "is not loaded" in error(http.delete("/v1/adapters/nope"), 404, "name")


def test_metrics_and_the_access_log_count_requests_and_tokens_without_prompt_text(api, caplog):
    with caplog.at_level(logging.INFO, logger="vera_jax.serving.access"):
        answer = ask(api, prompt="w5 w6 w7", max_tokens=3).json()
        wait_until(lambda: any('"route": "/v1/completions"' in r.getMessage() for r in caplog.records), "a log line")
    line = json.loads(next(r.getMessage() for r in caplog.records if "/v1/completions" in r.getMessage()))
    assert line["status"] == 200 and line["adapter"] == "a" and line["prompt_tokens"] == 3
    assert line["completion_tokens"] == len(answer["choices"][0]["token_ids"]) and "w5" not in json.dumps(line)
    text = api.http.get("/metrics").text
    for name in ("vera_requests_total", "vera_prompt_tokens_total", "vera_completion_tokens_total",
                 "vera_time_to_first_token_seconds_bucket", "vera_request_latency_seconds_bucket",
                 "vera_queue_depth", "vera_active_slots", "vera_adapters_resident", "vera_bank_bytes"):
        assert name in text, name
    resident = float(re.search(r"^vera_adapters_resident (\S+)$", text, re.M).group(1))
    assert resident == len(api.bank.names()) and float(re.search(r"^vera_bank_bytes (\S+)$", text, re.M).group(1)) > 0


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint", "/missing"], "--checkpoint: '/missing' does not exist"),
    (["--checkpoint", "EMPTY"], "no config.json"),                      # parses, then cannot load
    (["--checkpoint", "x", "--slots", "0"], "--slots: 0; expected an integer >= 1"),
    (["--checkpoint", "x", "--port", "70000"], "--port: 70000"),
    (["--checkpoint", "x", "--adapter-root", "/missing"], "--adapter-root: '/missing' is not a directory"),
    (["--slots", "1"], "the following arguments are required: --checkpoint")])
def test_bad_cli_flags_print_one_line_and_exit_2(flags, message, tmp_path, capsys):
    """main() in this process (a subprocess per case cost ~10 s of imports); the test below runs the
    real `python -m vera_jax.serving` once."""
    from vera_jax.serving.__main__ import main

    flags = [str(tmp_path) if f == "EMPTY" else f for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err


def test_the_module_entry_point_prints_one_line_and_exits_2():
    done = subprocess.run([sys.executable, "-m", "vera_jax.serving", "--checkpoint", "/missing"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "--checkpoint: '/missing' does not exist" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
