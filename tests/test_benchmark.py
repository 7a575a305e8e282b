"""experiments/benchmark.py on tiny shapes: the JSON record, the table, the PEFT rows and the
crossover sweep. Timings are never asserted (they depend on the machine's load)."""

import contextlib
import io
import json

import pytest

from experiments import benchmark

TINY = ["--model", "roberta-base", "--layers", "1", "--hidden", "32", "--batch", "2", "--seq", "16",
        "--iters", "2", "--warmup", "1", "--vera_r", "16"]


def _run(capsys, argv):
    record = benchmark.main(argv)
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(record))
    return record, out


@pytest.fixture(scope="module")
def with_peft(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "out.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        record = benchmark.main(TINY + ["--against", "peft", "--json", str(path)])
    assert json.loads(out.getvalue().strip().splitlines()[-1]) == json.loads(json.dumps(record))
    return record, out.getvalue(), path


def test_every_method_has_its_figures_and_ratios_to_the_floor(with_peft):
    record, _, path = with_peft
    assert json.loads(path.read_text()) == json.loads(json.dumps(record))
    assert list(record["methods"]) == list(benchmark.METHODS)
    for method, r in record["methods"].items():
        assert r["step_ms"] > 0 and r["compile_s"] > 0, method
        assert {"argument", "output", "temp", "alias", "peak_estimate", "device_peak"} <= set(r["memory"]), method
        assert r["step_vs_floor"] == pytest.approx(r["step_ms"] / record["methods"]["floor"]["step_ms"])
    floor = record["methods"]["floor"]
    assert floor["step_vs_floor"] == floor["compile_vs_floor"] == floor["memory_vs_floor"] == 1.0
    assert floor["trainable"] == 0
    assert (record["shape"]["layers"], record["shape"]["full_layers"], record["shape"]["tokens"]) == (1, 12, 32)


def test_trainable_counts_are_adapter_vectors_only(with_peft):
    methods = with_peft[0]["methods"]
    d, r, layers = 32, 16, 1
    assert methods["vera_auto"]["trainable"] == layers * 2 * (d + r)
    assert methods["lora"]["trainable"] == layers * 2 * 8 * (d + d)
    assert methods["full"]["trainable"] > 100 * methods["lora"]["trainable"]
    # full fine-tuning holds a second copy of the weights and their optimizer moments
    assert methods["full"]["memory_vs_floor"] > 2


def test_against_peft_adds_peft_rows_and_ratios(with_peft):
    record, text, _ = with_peft
    peft_rows = record["peft"]
    assert set(peft_rows) == {"peft_floor", "peft_vera", "peft_lora"}
    assert peft_rows["peft_vera"]["trainable"] == record["methods"]["vera_auto"]["trainable"]
    assert peft_rows["peft_lora"]["trainable"] == record["methods"]["lora"]["trainable"]
    for method in ("vera_merged", "vera_factored", "vera_auto"):
        r = record["methods"][method]
        assert r["step_vs_peft"] == pytest.approx(r["step_ms"] / peft_rows["peft_vera"]["step_ms"])
    assert "step_vs_peft" not in record["methods"]["full"]
    targets = [c["target"] for c in record["checks"]]
    assert any("PEFT" in t for t in targets) and len(targets) == 4
    for name in ("| floor |", "| vera_auto |", "| full |", "| peft_vera |", "| peft_lora |", "× PEFT", "load average"):
        assert name in text
    assert "1 of 12 layers" in text


def test_without_peft_the_table_has_no_peft_column(capsys):
    record, out = _run(capsys, TINY + ["--methods", "vera_merged", "--model", "llama-small"])
    assert list(record["methods"]) == ["floor", "vera_merged"]
    assert "peft" not in record and "× PEFT" not in out
    assert record["shape"]["model"] == "llama-small" and record["machine"]["load_avg"]


def test_crossover_rows_hold_measured_and_predicted_paths(capsys):
    record, out = _run(capsys, ["--crossover", "--hidden", "32", "--crossover_ranks", "4,64",
                                "--crossover_tokens", "8", "--iters", "1", "--warmup", "0"])
    assert [(x["r"], x["tokens"]) for x in record["rows"]] == [(4, 8), (64, 8)]
    for x in record["rows"]:
        assert x["merged_ms"] > 0 and x["factored_ms"] > 0 and x["width"] == 32
        assert x["measured"] in ("merged", "factored")
        assert x["predicted"] == benchmark.vera_jax.choose_path(x["tokens"], 32, 32, x["r"])
    assert "| 64 | 8 |" in out and "Cost-model crossover" in out


@pytest.mark.parametrize("r", [1, 64, 192, 193, 256, 1024, 4096])
def test_predicted_crossover_matches_choose_path(r):
    tokens = benchmark.predicted_crossover_tokens(768, r)
    if tokens is None:
        assert benchmark.vera_jax.choose_path(10**9, 768, 768, r) == "factored"
    else:
        assert benchmark.vera_jax.choose_path(tokens, 768, 768, r) == "merged"
        assert benchmark.vera_jax.choose_path(tokens - 1, 768, 768, r) == "factored"


@pytest.mark.parametrize("argv, message", [
    (["--methods", "floor,dora"], "unknown ['dora']"),
    (["--batch", "0"], "--batch"),
])
def test_bad_flags_are_named(capsys, argv, message):
    with pytest.raises(SystemExit):
        benchmark.main(argv)
    assert message in capsys.readouterr().err


def test_roberta_sequence_longer_than_positions_is_refused():
    with pytest.raises(ValueError, match="--seq: 600"):
        benchmark.make_batch(benchmark.model_config("roberta-base", 1), 1, 600)
