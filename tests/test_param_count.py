"""Paper parameter counts: the CLI against closed-form per-layer formulas and the VeRA paper."""

import json

import pytest

from experiments import param_count
from vera_jax.models import hub


@pytest.fixture(scope="module")
def rows():
    return param_count.table()


def _layer_shapes(hf_config, targets):
    """(d_in, d_out) of every targeted layer, from the config fields and the family's layout."""
    kind = hf_config["model_type"]
    if kind in ("roberta", "vit"):
        d, layers = hf_config["hidden_size"], hf_config["num_hidden_layers"]
        per_layer = {"query": (d, d), "value": (d, d)}
    elif kind == "gpt2":
        d, layers = hf_config["n_embd"], hf_config["n_layer"]
        per_layer = {"query": (d, d), "value": (d, d)}
    else:
        d, f, layers = hf_config["hidden_size"], hf_config["intermediate_size"], hf_config["num_hidden_layers"]
        head_dim = hf_config.get("head_dim") or d // hf_config["num_attention_heads"]
        q, kv = (head_dim * hf_config[k] for k in ("num_attention_heads", "num_key_value_heads"))
        per_layer = {"query": (d, q), "key": (d, kv), "value": (d, kv), "attn_out": (q, d),
                     "gate": (d, f), "up": (d, f), "down": (f, d)}
    assert set(targets) <= set(per_layer)
    return [per_layer[t] for t in targets] * layers


def test_every_paper_model_and_method_is_counted(rows):
    assert {(x["model"], x["method"]) for x in rows} == {
        (m, meth) for m in ("RoBERTa-base", "RoBERTa-large", "GPT-2 medium", "GPT-2 large", "ViT-B/16", "ViT-L/16",
                            "LLaMA-7B", "LLaMA-13B", "Llama-2-7B", "Llama-2-13B", "Gemma-3-1B", "Gemma-3-4B",
                            "Qwen2.5-7B", "Llama-3.1-8B") for meth in ("vera", "lora")}
    newer = [(x["model"], x["method"], x["r"], len(x["targets"])) for x in rows if not x["reported"]]
    assert newer == [(m, meth, r, n) for m in ("Gemma-3-1B", "Gemma-3-4B", "Qwen2.5-7B", "Llama-3.1-8B")
                     for n, rs in ((2, (1024, 8)), (7, (1024, 64))) for meth, r in zip(("vera", "lora"), rs)]


def test_counts_equal_closed_form(rows):
    for x in rows:
        shapes = _layer_shapes(hub.bundled_config(x["config"]), x["targets"])
        r = x["r"]
        if x["method"] == "vera":
            expected = sum(d_out + r for _, d_out in shapes)
        else:
            expected = sum(r * (d_in + d_out) for d_in, d_out in shapes)
        assert (x["layers"], x["trainable"]) == (len(shapes), expected), x


def test_counts_round_to_the_paper_tables(rows):
    """Every count matches the VeRA paper to its printed precision, except LoRA on GPT-2
    (the paper reuses the LoRA paper's 0.35M / 0.77M)."""
    for x in (x for x in rows if x["reported"]):
        reported = x["reported"]
        value, unit = float(reported[:-1]), {"K": 1e3, "M": 1e6}[reported[-1]]
        decimals = len(reported[:-1].partition(".")[2])
        matches = round(x["trainable"] / unit, decimals) == value
        assert matches == (not (x["model"].startswith("GPT-2") and x["method"] == "lora")), x


def test_cli_prints_markdown_and_json(capsys):
    param_count.main([])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| model | method | r |") and len(lines) == 2 + len(param_count.ROWS)
    assert "| RoBERTa-base | vera | 1024 | query,value | 24 | 43,008 |" in lines[2]
    param_count.main(["--json"])
    data = json.loads(capsys.readouterr().out)
    assert len(data) == len(param_count.ROWS)
    assert data[0] == {"model": "RoBERTa-base", "config": "roberta-base", "method": "vera", "r": 1024,
                       "targets": ["query", "value"], "layers": 24, "trainable": 43008, "reported": "0.043M"}
