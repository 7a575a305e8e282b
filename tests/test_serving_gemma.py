"""A Gemma 3 base served over HTTP with two adapters and Gemma's chat template (`chat.GEMMA`, carried by
the checkpoint's tokenizer), driven by the `openai` client: chat answers equal greedy generation on the
rendered template, and a row ends at <end_of_turn>, which is not the tokenizer's eos (as Gemma 3's
106 is not its <eos>, 1), with finish_reason "stop". And the rule that gives the stop ids."""

import concurrent.futures
import json

import numpy as np
import pytest
from _serving_tiny import (
    END_OF_TURN,
    EOS,
    gemma_tokenizer,
    live_server,
    random_vera,
    save_checkpoint,
    tiny,
    word_tokenizer,
)

import vera_jax
from vera_jax.models import generate, hub
from vera_jax.serving import BASE, chat
from vera_jax.serving.__main__ import build, parse_args

openai = pytest.importorskip("openai")
ADAPTERS = {"a": (("query", "value"), 0, 8), "b": (("value",), 3, 4)}
NEW = 10
STOPS = (EOS, END_OF_TURN)


def chat_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def greedy_until_stop(model, params, prompts) -> list[list[int]]:
    """Greedy tokens of equally long prompts, each cut after its first stop id (EOS or END_OF_TURN)."""
    out = np.asarray(generate.greedy(model, params, np.asarray(prompts), None, NEW, list(STOPS), 1)).tolist()
    ends = [next((i for i, t in enumerate(row) if t in STOPS), None) for row in out]
    return [row if end is None else row[: end + 1] for row, end in zip(out, ends)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, model, {name: merged params}, engine) of the server `python -m vera_jax.serving` builds."""
    root = tmp_path_factory.mktemp("serving_gemma")
    model, params, hf_config = tiny("gemma3")
    save_checkpoint(root / "ckpt", "gemma3", params, hf_config, gemma_tokenizer())
    merged = {BASE: params}
    args = ["--checkpoint", str(root / "ckpt"), "--slots", "4", "--max-length", "48"]
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        adapted = random_vera(params, *spec, key=40 + i)
        vera_jax.save_adapter(root / name, adapted)
        merged[name] = vera_jax.merge(adapted)
        args += ["--adapter", f"{name}={root / name}"]
    app, engine, _ = build(parse_args(args))
    with live_server(app) as url:
        yield url, model, merged, engine


def test_gemma_template_renders_gemma_turns_and_ends_them_with_end_of_turn():
    tok = gemma_tokenizer()
    messages = [{"role": "system", "content": "w8"}, {"role": "user", "content": " w9 w10 "},
                {"role": "assistant", "content": "w11"}, {"role": "user", "content": "w12"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<bos><start_of_turn>user\nw8\n\nw9 w10<end_of_turn>\n<start_of_turn>model\nw11<end_of_turn>\n"
        "<start_of_turn>user\nw12<end_of_turn>\n<start_of_turn>model\n")
    assert chat_ids(tok, messages[1:2]) == [5, 3, 6, 9, 10, END_OF_TURN, 3, 7]
    assert chat.end_of_turn_id(tok) == END_OF_TURN
    assert chat.stop_ids(tok) == (EOS, END_OF_TURN) and chat.stop_ids(tok, (7, EOS)) == (7, EOS, END_OF_TURN)
    assert chat.end_of_turn_id(word_tokenizer()) is None        # plain words after the answer: no turn token
    assert chat.stop_ids(word_tokenizer()) == (EOS,) and chat.stop_ids(None, [3]) == (3,)


def test_model_eos_ids_come_from_the_config_and_generation_config(tmp_path):
    assert hub.eos_token_ids({"eos_token_id": 1}) == (1,)
    assert hub.eos_token_ids({"eos_token_id": [128001, 128009]}, str(tmp_path)) == (128001, 128009)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106]}))
    assert hub.eos_token_ids({"eos_token_id": 1}, str(tmp_path)) == (1, 106)
    assert hub.eos_token_ids({}, str(tmp_path)) == (1, 106) and hub.eos_token_ids({}) == ()
    _, params, hf_config = tiny("gemma3")      # a checkpoint whose generation config lists another end id
    save_checkpoint(tmp_path / "ckpt", "gemma3", params, hf_config)
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, 9]}))
    engine = build(parse_args(["--checkpoint", str(tmp_path / "ckpt"), "--max-length", "16"]))[1]
    assert engine.eos_ids == {EOS, 9}


def test_chat_template_flag_names_a_shipped_template_or_a_file(tmp_path, capsys):
    (tmp_path / "t.jinja").write_text(chat.GEMMA)
    assert parse_args(["--checkpoint", "x", "--chat-template", "gemma"]).chat_template == "gemma"
    assert chat.load_template(str(tmp_path / "t.jinja")) == chat.GEMMA == chat.load_template("gemma")
    with pytest.raises(SystemExit):
        parse_args(["--checkpoint", "x", "--chat-template", "chatml"])
    assert "--chat-template: 'chatml' is neither a file nor a shipped template (['gemma'])" in capsys.readouterr().err


def test_chat_answers_equal_greedy_on_the_template_and_stop_at_end_of_turn(served):
    url, model, merged, engine = served
    assert engine.eos_ids == set(STOPS)
    tok = gemma_tokenizer()
    candidates = [[{"role": "user", "content": f"w{a} w{b}"}] for a in range(8, 100, 9) for b in range(10, 100, 13)]
    prompts = [chat_ids(tok, m) for m in candidates]
    jobs = []
    for name, params in merged.items():
        expected = greedy_until_stop(model, params, prompts)
        turn_ends = [i for i, e in enumerate(expected) if e[-1] == END_OF_TURN]
        assert turn_ends, f"{name}: no prompt whose greedy answer ends its turn within {NEW} tokens"
        jobs.append((name, turn_ends[0], expected[turn_ends[0]]))
        runs_on = next((i for i, e in enumerate(expected) if not set(e) & set(STOPS)), None)
        if runs_on is not None:
            jobs.append((name, runs_on, expected[runs_on]))
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=180)

    def ask(job):
        name, i, _ = job
        return api.chat.completions.create(model=name, messages=candidates[i], max_tokens=NEW, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:   # the adapters share decode steps
        answers = list(pool.map(ask, jobs))
    for (name, i, expected), answer in zip(jobs, answers):
        choice = answer.choices[0]
        assert choice.model_extra["token_ids"] == expected, (name, candidates[i])
        assert choice.finish_reason == ("stop" if expected[-1] in STOPS else "length"), (name, expected)
        assert choice.message.content == tok.decode(expected, skip_special_tokens=True)
        assert "<end_of_turn>" not in choice.message.content and answer.usage.prompt_tokens == len(prompts[i])
    assert sum(e[-1] == END_OF_TURN for _, _, e in jobs) == len(merged)
