"""The serving benchmark and load test run end to end at toy sizes and report what they promise."""

from experiments import serving_bench, serving_load


def test_serving_bench_reports_every_configuration_with_its_flop_ratio():
    record = serving_bench.run(layers=1, batch=4, context=8, adapters=[1, 6], vera_ranks=[8], lora_r=2,
                               lora_adapters=[1, 6], targets=["query", "value"], iters=1, warmup=1, hidden=64)
    assert [(e["r"], e["adapters"], e["distinct_in_batch"]) for e in record["vera"]] == [(8, 1, 1), (8, 6, 4)]
    assert [e["adapters"] for e in record["lora"]] == [1, 6]
    for entry in record["vera"] + record["lora"]:
        assert entry["tokens_per_s"] > 0 and 0 < entry["flop_ratio_vs_merged"] < 1
    assert record["vera"][0]["bytes_per_adapter"] == 1 * 2 * (8 + 64) * 4


def test_load_test_answers_every_request_without_compiling_during_the_load():
    record = serving_load.run(requests=24, concurrency=6, adapters=2, slots=4, max_length=48, hidden=32, layers=1,
                              deadline=300)
    assert record["requests_sent"] == 24 and record["failed"] == 0
    assert record["compiles_during_load"] == {"prefill": 0, "decode": 0}
    assert record["p99_latency_s"] >= record["p50_latency_s"] > 0 and record["generated_tokens"] > 0
