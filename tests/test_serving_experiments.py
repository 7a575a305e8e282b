"""The serving benchmark and load test run end to end at toy sizes and report what they promise; the
roofline cost model beside the benchmark counts a tiny shape as worked out by hand."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from experiments import serving_bench, serving_load
from experiments import serving_roofline as roofline
from vera_jax.adapters.config import VeraConfig
from vera_jax.adapters.targets import find_targets
from vera_jax.models import gpt2, hub

TEST_PEAKS = roofline.Peaks(1e11, 1e10, "test")


def test_serving_bench_reports_every_configuration_with_its_flop_and_roofline_ratios():
    record = serving_bench.run(layers=1, batch=4, context=8, adapters=[1, 6], vera_ranks=[8], lora_r=2,
                               lora_adapters=[1, 6], targets=["query", "value"], iters=1, warmup=1, hidden=64,
                               peaks=TEST_PEAKS, paired=True)
    assert [(e["r"], e["adapters"], e["distinct_in_batch"]) for e in record["vera"]] == [(8, 1, 1), (8, 6, 4)]
    assert [e["adapters"] for e in record["lora"]] == [1, 6]
    for entry in record["vera"] + record["lora"]:
        assert entry["tokens_per_s"] > 0 and 0 < entry["flop_ratio_vs_merged"] < 1
        assert 0 < entry["roofline_ratio_vs_merged"] < 1
        assert entry["err_roofline"] == pytest.approx(entry["vs_merged"] / entry["roofline_ratio_vs_merged"] - 1)
        assert entry["vs_merged"] == pytest.approx(entry["merged_step_s_paired"] / entry["step_s"])  # paired timing
    assert record["vera"][0]["bytes_per_adapter"] == 1 * 2 * (8 + 64) * 4
    assert record["peaks"] == TEST_PEAKS.as_dict() and record["cache_slots"] == 16
    assert record["cache_passes"] == 5 and record["lora_gathers_materialized"]  # XLA:CPU's layout of the step


# A GPT-2 small enough to count by hand: width 8, MLP 32, 1 layer, vocab 10, 2 heads; batch 2,
# 3 cache slots, float32 (4 bytes), the cache crossing memory 3 times.
TINY = {"n_embd": 8, "n_inner": None, "n_layer": 1, "vocab_size": 10, "n_head": 2}


def test_roofline_counts_a_tiny_decode_step_as_worked_out_by_hand():
    ops = roofline.merged_ops(TINY, batch=2, cache_slots=3, cache_passes=3)
    # FLOPs: 2 * B * (q,k,v,out 4*8*8 + mlp 2*8*32 + head 8*10) = 3392, attention 4 * B * S * w = 192.
    assert sum(op.flops for op in ops) == 3392 + 192
    weights = 4 * (4 * 64 + 2 * 256 + 10 * 8  # kernels and the tied head
                   + 4 * 8 + 32 + 8  # biases: q, k, v, out; mlp_in; mlp_out
                   + 2 * 16 + 16)  # two norms' scale and bias, ln_f
    cache = 3 * 2 * 2 * 3 * 8 * 4 + 2 * 2 * 8 * 4  # K, V over 3 slots, 3 passes; the new k, v written
    scores = 2 * 2 * 3 * (4 + 4 + 4 + 4)  # B H S scores written, read; probs written, read
    matmul_io = 4 * 2 * (4 * 16 + 40 + 40 + 18) + 2 * 2 * 8 * 4  # each dense's in + out; attention q in, out
    elementwise = 4 * 2 * (10 * 8 + 2 * 32) + 4 * 2 * 2 * 8  # block norms, adds, GELU; ln_f
    edges = 4 * 3 * 2 * 8 + 4 * 2 * 10 + 4 * 2  # embedding rows and sum; argmax reads logits, writes ids
    assert sum(op.bytes for op in ops) == weights + cache + scores + matmul_io + elementwise + edges == 8328

    # With 1 FLOP/s and 4 B/s the dense layers are compute-bound and the rest memory-bound, so the
    # per-op roofline is 3 * 256 + 256 + 1024 + 1024 + 320 (dense FLOPs) + (192 + 1600 + 1280 + 192 + 88) / 4.
    cost = roofline.summarize(ops, roofline.Peaks(1.0, 4.0, "hand"))
    assert cost["step_s"] == pytest.approx(3392 + (192 + 1600 + 1280 + 192 + 88) / 4) == 4230
    assert cost["memory_bound_share"] == pytest.approx(838 / 4230)

    shapes = roofline.target_shapes(TINY, ["query", "value"])
    vera = roofline.vera_ops(shapes, batch=2, r=4)
    # per target: A, B (4 * 4 * 8 each), x, hidden written + read, d and b rows, term written + read, y read + written
    assert sum(op.bytes for op in vera) == 2 * (128 + 128 + 64 + 2 * 32 + 4 * 2 * 12 + 2 * 64 + 2 * 64) == 1472
    assert sum(op.flops for op in vera) == 2 * (2 * 2 * 8 * 4 * 2) == 512
    lora = roofline.lora_ops(shapes, batch=2, r=2, distinct=1)
    # per target: one adapter's A, B (2 * 16 floats), x, hidden written + read, term written + read, y
    assert sum(op.bytes for op in lora) == 2 * (128 + 64 + 2 * 16 + 2 * 64 + 2 * 64) == 960
    materialized = roofline.lora_ops(shapes, batch=2, r=2, distinct=1, gathers_materialized=True)
    assert sum(op.bytes for op in materialized) == 960 + 2 * (2 * 4 * 2 * 2 * 16)  # the B per-row copies, twice
    more = roofline.lora_ops(shapes, batch=2, r=2, distinct=2)
    assert sum(op.bytes for op in more) - 960 == 2 * 128  # each further distinct adapter: its A, B once more


def test_target_shapes_are_the_models_targeted_layers():
    cfg = {**hub.bundled_config("gpt2-medium"), "n_layer": 2, "n_embd": 64, "n_head": 1}
    params = nn.meta.unbox(gpt2.build(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    targets = ["query", "key", "value", "attn_out", "mlp_in", "mlp_out"]
    specs = find_targets(params, VeraConfig(r=4, targets=tuple(targets)))
    assert sorted((s.in_features, s.out_features) for s in specs) == sorted(roofline.target_shapes(cfg, targets))
    with pytest.raises(ValueError, match="classifier"):
        roofline.target_shapes(cfg, ["classifier"])


def synthetic_block(device="NVIDIA H200"):
    row = {"r": 4, "adapters": 1, "distinct_in_batch": 1, "tokens_per_s": 190.0, "step_s": 0.0105,
           "vs_1_adapter": 1.0, "vs_merged": 0.95, "flop_ratio_vs_merged": 0.9}
    return {"model": "gpt2-medium", "layers_run": 1, "layers_real": 24, "width": 64, "device": device,
            "batch": 2, "context": 8, "targets": ["query", "value"],
            "merged": {"tokens_per_s": 200.0, "step_s": 0.01, "flops_per_token": 1.0},
            "vera": [row], "lora": [{**row, "r": 2, "vs_merged": 1.02, "flop_ratio_vs_merged": 0.99}]}


def test_predict_from_recomputes_a_stored_record_without_touching_its_measurements(tmp_path, capsys):
    stored = {"commands": {"b": "python -m experiments.serving_bench ..."}, "b": synthetic_block()}
    src, out = tmp_path / "rec.json", tmp_path / "out.json"
    src.write_text(json.dumps(stored))
    serving_bench.main(["--predict_from", str(src), "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["commands"] == stored["commands"] and "predict_from" in record["predicted_by"]
    block = record["b"]
    assert block["peaks"]["bandwidth"] == 4.8e12 and block["cache_passes"] == 3 and block["cache_slots"] == 16
    cfg = {**hub.bundled_config("gpt2-medium"), "n_layer": 1, "n_embd": 64, "n_head": 1}
    peaks = roofline.known_peaks("NVIDIA H200", "float32")
    base = roofline.merged_ops(cfg, 2, 16)
    shapes = roofline.target_shapes(cfg, ["query", "value"])
    expect = (roofline.summarize(base, peaks)["step_s"]
              / roofline.summarize(base + roofline.vera_ops(shapes, 2, 4), peaks)["step_s"])
    vera = block["vera"][0]
    assert vera["roofline_ratio_vs_merged"] == pytest.approx(expect)
    assert vera["err_roofline"] == pytest.approx(0.95 / expect - 1)
    assert vera["err_flop_only"] == pytest.approx(0.95 / 0.9 - 1)
    for key, value in stored["b"]["vera"][0].items():  # measured numbers copied as they were
        assert vera[key] == value
    assert block["merged"]["step_s"] == 0.01
    assert "within 10%" in capsys.readouterr().out

    # a device the table does not know needs both peaks from the flags; they are then recorded
    src.write_text(json.dumps(synthetic_block(device="Some TPU")))
    with pytest.raises(SystemExit, match="--peak_flops"):
        serving_bench.main(["--predict_from", str(src)])
    serving_bench.main(["--predict_from", str(src), "--peak_flops=1e12", "--peak_bandwidth=1e11", "--json", str(out)])
    assert json.loads(out.read_text())["peaks"]["bandwidth"] == 1e11


@pytest.mark.parametrize("argv, flag", [
    (["--peak_flops=0"], "--peak_flops"), (["--peak_bandwidth=-3"], "--peak_bandwidth"),
    (["--cache_passes=0"], "--cache_passes"), (["--adapters=1,x"], "--adapters"), (["--batch=0"], "--batch"),
    (["--hidden=100"], "--hidden"), (["--tolerance=1.5"], "--tolerance"),
    (["--predict_from=/nonexistent/record.json"], "--predict_from"),
])
def test_bad_flags_are_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        serving_bench.parse_args(argv)
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_load_test_answers_every_request_without_compiling_during_the_load():
    record = serving_load.run(requests=12, concurrency=(2, 6), adapters=2, slots=4, max_length=48, hidden=32,
                              layers=1, deadline=300)
    assert [r["concurrency"] for r in record["levels"]] == [2, 6]
    for r in record["levels"]:
        assert r["requests_sent"] == 12 and r["failed"] == 0 and r["generated_tokens"] > 0
        assert r["p99_latency_s"] >= r["p50_latency_s"] >= r["p50_ttft_s"] > 0 and r["p99_ttft_s"] >= r["p50_ttft_s"]
    assert record["compiles_during_load"] == {"prefill": 0, "decode": 0}
    assert max(int(k) for k in record["engine"]["prefill_rows"]) > 1
    assert "| 6 | 12 | 0 |" in serving_load.markdown(record)


def test_load_test_refuses_a_bad_concurrency_list(capsys):
    with pytest.raises(SystemExit) as exit_info:
        serving_load.parse_args(["--concurrency=8,x"])
    assert exit_info.value.code == 2 and "--concurrency" in capsys.readouterr().err
