"""experiments/benchmark on tiny shapes: the record, its table, the PEFT rows, the trainer's step
it times, the crossover sweep and the CLI's flags. Timings are never asserted (they depend on the
machine's load)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

import vera_jax
from experiments.benchmark import __main__ as cli
from experiments.benchmark import crossover, floor_profile, quantized, report, shapes, steps
from vera_jax import quant
from vera_jax.models import hub, llama

TINY = dict(model="roberta-base", layers=1, hidden=32, batch=2, seq=16, iters=2, warmup=1, vera_r=16, lora_r=8,
            dtype="float32")


@pytest.fixture(scope="module")
def with_peft():
    record = report.benchmark_record(**TINY, methods=list(steps.METHODS), against_peft=True)
    return record, report.markdown(record)


@pytest.fixture
def run_cli(capsys):
    """Parses argv as the CLI's flags, runs main, returns stdout; leaves the flags unparsed."""
    def run(*argv):
        cli.FLAGS(["benchmark", *argv])
        cli.main(["benchmark"])
        return capsys.readouterr().out

    yield run
    cli.FLAGS.unparse_flags()


def test_every_method_has_its_figures_and_ratios_to_the_floor(with_peft):
    record, _ = with_peft
    assert list(record["methods"]) == list(steps.METHODS)
    for method, r in record["methods"].items():
        assert r["step_ms"] > 0 and r["compile_s"] > 0, method
        assert {"argument", "output", "temp", "alias", "peak_estimate", "device_peak"} <= set(r["memory"]), method
        assert r["step_vs_floor"] == pytest.approx(r["step_ms"] / record["methods"]["floor"]["step_ms"])
    floor = record["methods"]["floor"]
    assert floor["step_vs_floor"] == floor["compile_vs_floor"] == floor["memory_vs_floor"] == 1.0
    assert floor["trainable"] == 0
    assert (record["shape"]["layers"], record["shape"]["full_layers"], record["shape"]["tokens"]) == (1, 12, 32)
    assert json.loads(json.dumps(record)) == record


def test_minimum_beside_each_step_is_the_floor_plus_the_cost_models_extra(with_peft):
    """Hand count at TINY (1 layer, query and value 32 x 32, 32 tokens, VeRA r=16, LoRA r=8):
    merged adds T*in*out + 3*in*r*out multiply-adds per layer, factored T*r*(2*in+3*out) (VeRA)
    and 3*T*r*(in+out) (LoRA); FLOPs are twice that."""
    methods = with_peft[0]["methods"]
    t, d = 32, 32
    merged, vera_factored, lora_factored = t * d * d + 3 * d * 16 * d, t * 16 * 5 * d, 3 * t * 8 * 2 * d
    assert methods["vera_merged"]["extra_flops_min"] == 2 * 2 * merged
    assert methods["vera_factored"]["extra_flops_min"] == 2 * 2 * vera_factored
    assert methods["lora"]["extra_flops_min"] == 2 * 2 * min(lora_factored, t * d * d + 3 * d * 8 * d)
    assert methods["vera_auto"]["extra_flops_min"] == 2 * 2 * min(merged, vera_factored)
    assert methods["full"]["extra_flops_min"] is None and methods["full"]["step_vs_min"] is None
    floor = methods["floor"]
    assert floor["xla_flops"] > 0 and floor["min_vs_floor"] == 1.0
    for name in ("vera_merged", "vera_factored", "lora"):
        r = methods[name]
        assert r["min_vs_floor"] == pytest.approx((floor["xla_flops"] + r["extra_flops_min"]) / floor["xla_flops"])
        assert r["step_vs_min"] == pytest.approx(r["step_vs_floor"] / r["min_vs_floor"])
        assert r["xla_flops_vs_floor"] == pytest.approx(r["xla_flops"] / floor["xla_flops"])
    assert "minimum × floor" in with_peft[1] and "× minimum" in with_peft[1]


def test_trainable_counts_are_adapter_vectors_only(with_peft):
    methods = with_peft[0]["methods"]
    d, r, layers = 32, 16, 1
    assert methods["vera_auto"]["trainable"] == layers * 2 * (d + r)
    assert methods["lora"]["trainable"] == layers * 2 * 8 * (d + d)
    assert methods["full"]["trainable"] > 100 * methods["lora"]["trainable"]
    # full fine-tuning holds a second copy of the weights and their optimizer moments
    assert methods["full"]["memory_vs_floor"] > 2


def test_against_peft_adds_peft_rows_and_ratios(with_peft):
    record, text = with_peft
    peft_rows = record["peft"]
    assert set(peft_rows) == {"peft_floor", "peft_vera", "peft_lora"}
    assert peft_rows["peft_vera"]["trainable"] == record["methods"]["vera_auto"]["trainable"]
    assert peft_rows["peft_lora"]["trainable"] == record["methods"]["lora"]["trainable"]
    for method in ("vera_merged", "vera_factored", "vera_auto"):
        r = record["methods"][method]
        assert r["step_vs_peft"] == pytest.approx(r["step_ms"] / peft_rows["peft_vera"]["step_ms"])
    assert "step_vs_peft" not in record["methods"]["full"]
    for name in ("| floor |", "| vera_auto |", "| full |", "| peft_vera |", "| peft_lora |", "× PEFT", "load average"):
        assert name in text
    assert "1 of 12 layers" in text


def test_the_timed_step_is_the_trainers():
    """One step updates the adapter vectors with the trainer's optimizer and reports its metrics."""
    cfg = shapes.model_config("roberta-base", layers=1, hidden=32)
    model = hub.family("roberta").build(cfg)
    ids, labels = shapes.make_batch(cfg, 2, 8)
    params = nn.unbox(model.init(jax.random.key(0), ids))["params"]
    adapted = steps.adapted_for("vera_auto", params, 16, 8)
    step, state, frozen = steps.trainer_step(model, adapted, "auto", "float32")
    new, metrics = jax.jit(step)(state, frozen, {"ids": ids, "labels": labels})
    assert int(new.step) == 1 and {"loss", "grad_norm", "lr/adapter"} <= set(metrics)
    assert float(metrics["lr/adapter"]) == pytest.approx(steps.LEARNING_RATE)
    # b starts at zero, so d's first gradient is zero: the first step moves every b
    before = jax.tree_util.tree_flatten_with_path(state.trainable.adapter)[0]
    after = jax.tree.leaves(new.trainable.adapter)
    moved = {jax.tree_util.keystr(p): bool(jnp.any(a != b)) for (p, a), b in zip(before, after)}
    assert [k for k, v in moved.items() if v] == [k for k in moved if "lambda_b" in k] != []
    assert vera_jax.count_trainable(adapted) == 2 * (32 + 16)


def test_cli_prints_the_json_record_and_writes_it(run_cli, tmp_path):
    path = tmp_path / "out.json"
    out = run_cli("--model=llama-small", "--layers=1", "--hidden=32", "--batch=2", "--seq=8", "--iters=1",
                  "--warmup=0", "--vera_r=16", "--methods=vera_merged", f"--json={path}")
    record = json.loads(out)
    assert record == json.loads(path.read_text())
    assert list(record["methods"]) == ["floor", "vera_merged"]
    assert "peft" not in record and record["shape"]["model"] == "llama-small" and record["machine"]["load_avg"]
    assert set(record) == {"mode", "shape", "methods", "machine"}


def test_cli_crossover_rows_hold_measured_and_predicted_paths(run_cli):
    out = run_cli("--crossover", "--hidden=32", "--crossover_ranks=4,64", "--crossover_tokens=8", "--iters=1",
                  "--warmup=0", "--format=markdown")
    assert "| 64 | 8 |" in out and "Cost-model crossover" in out
    record = crossover.crossover_record("roberta-base", 32, [4, 64], [8], 1, 0, "float32")
    assert [(x["r"], x["tokens"]) for x in record["rows"]] == [(4, 8), (64, 8)]
    for x in record["rows"]:
        assert x["merged_ms"] > 0 and x["factored_ms"] > 0 and x["width"] == 32
        assert x["measured"] in ("merged", "factored")
        assert x["predicted"] == vera_jax.choose_path(x["tokens"], 32, 32, x["r"])


@pytest.mark.parametrize("r", [1, 64, 192, 193, 256, 1024, 4096])
def test_predicted_crossover_matches_choose_path(r):
    tokens = crossover.predicted_crossover_tokens(768, r)
    if tokens is None:
        assert vera_jax.choose_path(10**9, 768, 768, r) == "factored"
    else:
        assert vera_jax.choose_path(tokens, 768, 768, r) == "merged"
        assert vera_jax.choose_path(tokens - 1, 768, 768, r) == "factored"


@pytest.mark.parametrize("argv, message", [
    (["--methods=floor,dora"], "unknown ['dora']"),
    (["--batch=0"], "--batch=0"),
    (["--crossover_ranks=4,x"], "--crossover_ranks: expected comma-separated positive integers"),
])
def test_bad_flags_are_named(argv, message):
    try:
        with pytest.raises(flags.IllegalFlagValueError) as e:
            cli.FLAGS(["benchmark", *argv])
        assert message in str(e.value)
    finally:
        cli.FLAGS.unparse_flags()


def test_roberta_sequence_longer_than_positions_is_refused():
    with pytest.raises(ValueError, match="seq: 600"):
        shapes.make_batch(shapes.model_config("roberta-base", 1), 1, 600)


def test_quantized_benchmark_rows_floor_minimum_and_vera_over_lora_ratios():
    """The Appendix C benchmark on a tiny LLaMA: per base a floor row and each method:rank row,
    the minimum beside each step, VeRA / LoRA r=64 ratios; bfloat16 compute on the NF4 base
    keeps the kernels' codes and scales as stored (cast_params) and dequantizes to bfloat16."""
    cfg = quantized.llama_config(layers=1, hidden=64, vocab=64)
    record = quantized.benchmark(cfg, ["nf4"], [("vera", 64), ("lora", 64), ("vera", 16)], batch=2, seq=8,
                                 iters=1, warmup=0, dtype="bfloat16")
    keys = [(row["base"], row["method"], row["r"]) for row in record["rows"]]
    assert keys == [("nf4", m, r) for m, r in (("floor", 0), ("vera", 64), ("lora", 64), ("vera", 16))]
    tokens = 16
    for row in record["rows"]:
        assert row["step_ms"] > 0 and row["xla_flops"] > 0 and row["memory"]["peak_estimate"] > 0
        if row["method"] == "floor":
            assert row["min_vs_floor"] == 1.0 and row["trainable"] == 0
        else:
            assert row["min_vs_floor"] > 1.0 and row["step_vs_min"] == pytest.approx(
                row["step_vs_floor"] / row["min_vs_floor"])
    vera64 = next(r for r in record["rows"] if (r["base"], r["method"], r["r"]) == ("nf4", "vera", 64))
    # factored VeRA: tokens * r * (2 * in + 3 * out) multiply-adds per layer, summed over the 7 linear layers
    shapes = [(64, 64)] * 4 + [(64, 192), (64, 192), (192, 64)]  # one kv head of 64: k, v are 64 x 64
    assert vera64["extra_flops_min"] == 2 * sum(tokens * 64 * (2 * i + 3 * o) for i, o in shapes)
    assert vera64["quantized_params"] > 0 and set(record["ratios"]) == {"nf4/vera_r64_over_lora_r64",
                                                                         "nf4/vera_r16_over_lora_r64"}
    params = jax.jit(lambda: nn.unbox(llama.build(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))[
        "params"])()
    q = quant.quantize_params(params, "nf4")
    cast = vera_jax.train.cast_params(q, jnp.bfloat16)
    kernel, before = cast["layer_0"]["attention"]["query"]["kernel"], q["layer_0"]["attention"]["query"]["kernel"]
    assert kernel.dequantize().dtype == jnp.bfloat16 and kernel.absmax_scale.dtype == jnp.float32
    np.testing.assert_array_equal(kernel.dequantize(), before.dequantize().astype(jnp.bfloat16))


def test_count_only_counts_the_same_programs_without_weights(with_peft):
    """--count_only lowers the same steps on abstract weights: the same XLA FLOPs and minimum as
    the timed run, no timings; the quantized benchmark's count mode likewise."""
    record = report.benchmark_record(**TINY, methods=list(steps.METHODS), against_peft=False, count_only=True)
    assert record["mode"] == "count"
    timed = with_peft[0]["methods"]
    for method, r in record["methods"].items():
        assert "step_ms" not in r and r["xla_flops"] == timed[method]["xla_flops"], method
        assert r["min_vs_floor"] == timed[method]["min_vs_floor"], method
    assert "XLA GFLOPs" in report.markdown(record)
    cfg = quantized.llama_config(layers=1, hidden=64, vocab=64)
    counted = quantized.benchmark(cfg, ["nf4"], [("vera", 16)], batch=2, seq=8, iters=1, warmup=0, count_only=True)
    ran = quantized.benchmark(cfg, ["nf4"], [("vera", 16)], batch=2, seq=8, iters=1, warmup=0)
    assert [r["xla_flops"] for r in counted["rows"]] == [r["xla_flops"] for r in ran["rows"]]
    assert counted["mode"] == "count" and counted["ratios"] == {}


def test_floor_profile_times_the_same_computation_in_jax_and_torch(run_cli):
    calls = floor_profile.part_calls(32, 2, 2, 8, "float32", against_torch=True)
    for part in floor_profile.PARTS:
        got, want = np.asarray(calls[f"jax/{part}"]()), calls[f"torch/{part}"]().numpy()
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5, err_msg=part)
    out = run_cli("--floor_profile", "--hidden=32", "--batch=2", "--seq=8", "--iters=1", "--warmup=0",
                  "--format=markdown")
    assert all(f"| {part} |" in out for part in floor_profile.PARTS) and "XLA_FLAGS=" in out
