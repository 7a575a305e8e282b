"""Serving benchmark: decode tokens/s at a fixed batch with N distinct adapters in the batch.

    python -m experiments.serving_bench --layers=2 --batch=16 --adapters=1,16,256,1000,10000 --json=out.json

Times one decode step (batch rows x 1 new token over a cache filled to --context) of a
GPT-2-medium-shaped model (random weights; --layers cuts the depth to fit the machine, stated in
the record) for:
  merged   the single model, no adapter term (what serving one merged adapter costs);
  vera     `BankDecoder` with N adapters resident in one group (d, b stacked, A/B shared), each
           batch row on its own adapter (N >= batch: all distinct; N < batch: row i -> i mod N),
           at each --vera_ranks on query/value;
  lora     the per-row gathered baseline a LoRA server runs (every row gathers its own A_i (r, in)
           and B_i (out, r), as BGMV does), at --lora_r.
Beside each measured ratio it puts two predictions: the FLOP ratio (base FLOPs per token: every
matmul, attention over the context, the LM head; over base + adapter-term FLOPs), and the roofline
ratio of `experiments.serving_roofline`, which also counts the bytes each step moves (weights, KV
cache, the adapter's shared and gathered arrays, activations) and so sees that batched decode at
these shapes is memory-bound; each with its error measured / predicted - 1. Peaks come from the
device's datasheet (`serving_roofline.KNOWN_PEAKS`), from --peak_flops/--peak_bandwidth, or, for a
device the table does not know (a CPU) or with --calibrate, from a matmul and a copy timed at startup;
the record says which. The record says how many bytes each adapter holds on device and how many
were resident.

    python -m experiments.serving_bench --predict_from experiments/serving_bench_h200.json --json out.json

recomputes the predictions of an existing record from its shapes and device without running it
(measured numbers are copied as they were).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import serving_roofline as roofline
from vera_jax.adapters.config import VeraConfig
from vera_jax.adapters.hooks import LayerCall, layer_hooks
from vera_jax.adapters.targets import find_targets
from vera_jax.models import hub, loader
from vera_jax.models.generate import ModelDecoder
from vera_jax.serving.batched import BankDecoder


@dataclasses.dataclass(frozen=True)
class LoraGatherDecoder:
    """Per-row LoRA: row i adds ((x @ A[ids_i].T) @ B[ids_i].T) * scaling, gathering whole matrices."""

    model: nn.Module
    layers: tuple
    scaling: float = 1.0

    def init_cache(self, batch_size, max_length):
        return self.model.init_cache(batch_size, max_length)

    def prepare(self, params, tokens):
        return params

    def apply(self, prepared, input_ids, attention_mask, cache, rows):
        ids = rows[:, 0]

        def hook(call: LayerCall):
            a, b = prepared["A"][call.spec.name][ids], prepared["B"][call.spec.name][ids]
            h = jnp.einsum("bti,bri->btr", call.x.astype(jnp.float32), a)
            return call.add(jnp.einsum("btr,bor->bto", h, b) * self.scaling)

        with layer_hooks(self.layers, hook):
            return self.model.apply({"params": prepared["base"]}, input_ids, attention_mask=attention_mask,
                                    cache=cache)


def base_flops(cfg: dict, context: int) -> float:
    """FLOPs per decoded token of the GPT-2 model: matmuls, attention over the context, LM head."""
    w, layers = cfg["n_embd"], cfg["n_layer"]
    inner = cfg.get("n_inner") or 4 * w
    per_layer = 4 * w * w + 2 * w * inner + 2 * context * w
    return 2.0 * (layers * per_layer + w * cfg["vocab_size"])


def compile_step(decoder, arrays, cache, rows, batch):
    """One jitted decode step over fixed arguments, as a no-argument call that waits for its result."""
    mask = jnp.ones((batch, cache["layer_0"]["key"].shape[1]), jnp.int32)
    tokens = jnp.arange(batch, dtype=jnp.int32)[:, None] % 50000 + 1

    @jax.jit
    def step(arrays, cache, rows):
        logits, _ = decoder.apply(arrays, tokens, mask, cache, rows)
        return jnp.argmax(logits[:, -1], axis=-1)

    return lambda: step(arrays, cache, rows).block_until_ready()


def time_steps(calls, iters, warmup) -> list[float]:
    """Median seconds of each call, run round-robin: with several calls, load that comes and goes on
    a shared machine falls on all of them alike instead of on whichever ran during it."""
    for call in calls:
        for _ in range(warmup):
            call()
    times = [[] for _ in calls]
    for _ in range(iters):
        for call, seen in zip(calls, times):
            start = time.perf_counter()
            call()
            seen.append(time.perf_counter() - start)
    return [statistics.median(seen) for seen in times]


def row_ids(n: int, batch: int, rng) -> np.ndarray:
    """(batch, 1) rows 1..n: all distinct when n >= batch, else row i -> 1 + i mod n."""
    ids = rng.choice(n, batch, replace=False) if n >= batch else np.arange(batch) % n
    return (ids + 1).astype(np.int32)[:, None]


def run(layers, batch, context, adapters, vera_ranks, lora_r, lora_adapters, targets, iters, warmup,
        hidden=None, peaks: roofline.Peaks | None = None, cache_passes: int | None = None,
        paired: bool = False) -> dict:
    """Times every configuration; with `peaks` (default: `local_peaks()`), adds the roofline
    predictions (`serving_roofline.predict_block`) beside the measured and FLOP-only ratios. With
    `paired`, each row's `vs_merged` comes from the merged step timed round-robin with that row
    (`merged_step_s_paired`), not from the one merged timing taken first: on a shared machine whose
    load drifts between rows, only a paired ratio compares like with like."""
    cfg = {**hub.bundled_config("gpt2-medium"), "n_layer": layers}
    if hidden:
        cfg.update(n_embd=hidden, n_head=max(1, hidden // 64))
    loaded = loader.random_model(cfg)
    model, params = loaded.module, loaded.params
    cache = model.init_cache(batch, context + 8)
    cache = {**cache, "index": jnp.full((batch,), context, jnp.int32)}
    rng = np.random.RandomState(0)
    key = jax.random.key(1)
    base = base_flops(cfg, context)
    merged_call = compile_step(ModelDecoder(model), params, cache, None, batch)
    merged_s = time_steps([merged_call], iters, warmup)[0]

    def timed(decoder, arrays, rows) -> tuple[float, float]:
        """(row step, merged step it is compared with): paired round-robin, or the merged timing."""
        call = compile_step(decoder, arrays, cache, rows, batch)
        if not paired:
            return time_steps([call], iters, warmup)[0], merged_s
        row_s, ref_s = time_steps([call, merged_call], iters, warmup)
        return row_s, ref_s

    record = {"model": "gpt2-medium", "layers_run": layers, "layers_real": 24, "width": cfg["n_embd"],
              "note": "random weights; depth cut to fit the machine; widths, heads and vocab are GPT-2-medium's",
              "device": jax.devices()[0].device_kind, "batch": batch, "context": context, "targets": targets,
              "dtype": "float32", "cache_slots": cache["layer_0"]["key"].shape[1], "paired": paired,
              "merged": {"tokens_per_s": batch / merged_s, "step_s": merged_s, "flops_per_token": base},
              "vera": [], "lora": []}
    for r in vera_ranks:
        specs = find_targets(params, VeraConfig(r=r, targets=tuple(targets)))
        if sorted((s.in_features, s.out_features) for s in specs) != sorted(roofline.target_shapes(cfg, targets)):
            raise AssertionError("serving_roofline.target_shapes disagrees with the model's targeted layers")
        in_max, out_max = max(s.in_features for s in specs), max(s.out_features for s in specs)
        term = sum(2.0 * r * (s.in_features + s.out_features) for s in specs)
        per_adapter = sum((r + s.out_features) * 4 for s in specs)
        first = None
        for n in adapters:
            k = jax.random.fold_in(key, n * 7919 + r)
            group = {"projections": {"A": jax.random.normal(k, (r, in_max)) * 0.03,
                                     "B": jax.random.normal(k, (out_max, r)) * 0.03},
                     "d": {s.name: jax.random.normal(jax.random.fold_in(k, i), (n + 1, r))
                           for i, s in enumerate(specs)},
                     "b": {s.name: jax.random.normal(jax.random.fold_in(k, 99 + i), (n + 1, s.out_features)) * 0.01
                           for i, s in enumerate(specs)}}
            decoder = BankDecoder(model, (("bench", specs),))
            step_s, ref_s = timed(decoder, {"base": params, "groups": [group]}, row_ids(n, batch, rng))
            first = first or step_s
            record["vera"].append({
                "r": r, "adapters": n, "distinct_in_batch": min(n, batch), "tokens_per_s": batch / step_s,
                "step_s": step_s, "vs_1_adapter": first / step_s, "vs_merged": ref_s / step_s,
                "flop_ratio_vs_merged": base / (base + term), "bytes_per_adapter": per_adapter,
                "resident_adapter_bytes": per_adapter * n,
                "shared_projection_bytes": 4 * r * (in_max + out_max),
                **({"merged_step_s_paired": ref_s} if paired else {})})
            del group
    specs = find_targets(params, VeraConfig(r=lora_r, targets=tuple(targets)))
    term = sum(2.0 * lora_r * (s.in_features + s.out_features) for s in specs)
    first = None
    for n in lora_adapters:
        k = jax.random.fold_in(key, n)
        arrays = {"base": params,
                  "A": {s.name: jax.random.normal(k, (n + 1, lora_r, s.in_features)) * 0.03 for s in specs},
                  "B": {s.name: jax.random.normal(k, (n + 1, s.out_features, lora_r)) * 0.03 for s in specs}}
        step_s, ref_s = timed(LoraGatherDecoder(model, specs), arrays, row_ids(n, batch, rng))
        first = first or step_s
        per_adapter = sum(lora_r * (s.in_features + s.out_features) * 4 for s in specs)
        record["lora"].append({
            "r": lora_r, "adapters": n, "distinct_in_batch": min(n, batch), "tokens_per_s": batch / step_s,
            "step_s": step_s, "vs_1_adapter": first / step_s, "vs_merged": ref_s / step_s,
            "flop_ratio_vs_merged": base / (base + term), "bytes_per_adapter": per_adapter,
            "resident_adapter_bytes": per_adapter * n, **({"merged_step_s_paired": ref_s} if paired else {})})
        del arrays
    return roofline.predict_block(record, peaks or local_peaks(), cache_passes)


def local_peaks(peak_flops: float | None = None, peak_bandwidth: float | None = None,
                calibrate: bool = False) -> roofline.Peaks:
    """Peaks of the device this process runs on: the flags where given, else the datasheet figures
    of a known device kind, else (or with `calibrate`) measured at startup."""
    kind = jax.devices()[0].device_kind
    base = None if calibrate else roofline.known_peaks(kind, "float32")
    base = base or roofline.calibrate()
    if peak_flops is None and peak_bandwidth is None:
        return base
    return roofline.Peaks(peak_flops or base.flops, peak_bandwidth or base.bandwidth,
                          f"flags (--peak_flops={peak_flops}, --peak_bandwidth={peak_bandwidth}); "
                          f"rest from: {base.source}")


def record_peaks(block: dict, peak_flops: float | None, peak_bandwidth: float | None) -> roofline.Peaks:
    """Peaks for re-predicting a stored block: the flags, else the peaks the block stored, else the
    datasheet figures of its device; ValueError naming the flags when none of these exists."""
    stored = block.get("peaks")
    base = (roofline.Peaks(**stored) if stored
            else roofline.known_peaks(block["device"], block.get("dtype", "float32")))
    if base is None and (peak_flops is None or peak_bandwidth is None):
        raise ValueError(f"device {block['device']!r} has no stored or known peaks; pass both "
                         f"--peak_flops and --peak_bandwidth (known: {sorted(roofline.KNOWN_PEAKS)})")
    if peak_flops is None and peak_bandwidth is None:
        return base
    return roofline.Peaks(peak_flops or base.flops, peak_bandwidth or base.bandwidth,
                          f"flags (--peak_flops={peak_flops}, --peak_bandwidth={peak_bandwidth})"
                          + (f"; rest from: {base.source}" if base else ""))


def predict_from(record: dict, peak_flops=None, peak_bandwidth=None, cache_passes=None, tolerance=0.10) -> dict:
    """A copy of a stored record (one run, or several under keys) with every block's roofline
    predictions recomputed from its shapes and device; measured numbers are not touched."""
    out = dict(record)
    for name, block in roofline.record_blocks(record).items():
        predicted = roofline.predict_block(block, record_peaks(block, peak_flops, peak_bandwidth), cache_passes,
                                           tolerance)
        if name == "run":
            return predicted
        out[name] = predicted
    return out


def positive_ints(text: str) -> list[int]:
    """argparse type of a comma-separated list of positive integers."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.serving_bench", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2, help="GPT-2-medium depth actually run (24 in the real model)")
    p.add_argument("--hidden", type=int, default=None, help="override the width (one head per 64); quick checks")
    p.add_argument("--batch", type=int, default=16, help="rows decoded per step")
    p.add_argument("--context", type=int, default=128, help="tokens already in every row's cache")
    p.add_argument("--adapters", type=positive_ints, default=[1, 16, 256, 1000, 10000],
                   help="N adapters, comma-separated")
    p.add_argument("--vera_ranks", type=positive_ints, default=[256, 1024], help="VeRA ranks")
    p.add_argument("--lora_r", type=int, default=8, help="LoRA rank of the per-row gathered baseline")
    p.add_argument("--lora_adapters", type=positive_ints, default=[1, 16, 256, 1000],
                   help="N for LoRA (its stacks hold r*(in+out) per layer per adapter)")
    p.add_argument("--targets", type=lambda t: t.split(","), default=["query", "value"], help="adapted modules")
    p.add_argument("--iters", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--paired", action="store_true",
                   help="time the merged model round-robin with each row and take vs_merged from that pair "
                        "(for a shared machine whose load drifts between rows)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps")
    p.add_argument("--json", default=None, help="also write the record here")
    p.add_argument("--peak_flops", type=float, default=None,
                   help="matmul FLOP/s for the roofline (default: the device's datasheet figure from "
                        "serving_roofline.KNOWN_PEAKS, e.g. H200 float32 = TF32 494.5e12; else measured)")
    p.add_argument("--peak_bandwidth", type=float, default=None,
                   help="memory bytes/s for the roofline (default: datasheet, e.g. H200 4.8e12; else measured)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure the peaks at startup (a matmul and a copy) even on a device with datasheet figures")
    p.add_argument("--cache_passes", type=int, default=None,
                   help="times the KV cache crosses memory per step (default: the backend's, GPU 3: the "
                        "non-donated cache is copied, read + write, then attention reads it; CPU 5: also "
                        "transposed; 1 for an engine that donates its cache)")
    p.add_argument("--tolerance", type=float, default=0.10, help="|measured / predicted - 1| counted as a match")
    p.add_argument("--predict_from", default=None,
                   help="a stored record (JSON): recompute its predictions without running anything")
    a = p.parse_args(argv)
    for flag in ("layers", "batch", "context", "lora_r", "iters", "cache_passes"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(a, flag)}")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    if a.hidden is not None and (a.hidden < 64 or a.hidden % 64):
        p.error(f"--hidden must be a positive multiple of 64 (one head per 64), got {a.hidden}")
    for flag in ("peak_flops", "peak_bandwidth"):
        if getattr(a, flag) is not None and not getattr(a, flag) > 0:
            p.error(f"--{flag} must be > 0, got {getattr(a, flag)}")
    if not 0 < a.tolerance < 1:
        p.error(f"--tolerance must be in (0, 1), got {a.tolerance}")
    if a.predict_from is not None and not os.path.isfile(a.predict_from):
        p.error(f"--predict_from: no such file {a.predict_from!r}")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.predict_from:
        with open(a.predict_from) as f:
            try:
                stored = json.load(f)
            except json.JSONDecodeError as e:
                sys.exit(f"--predict_from: {a.predict_from} is not JSON: {e}")
        try:
            record = predict_from(stored, a.peak_flops, a.peak_bandwidth, a.cache_passes, a.tolerance)
        except (KeyError, ValueError) as e:
            sys.exit(f"--predict_from: {a.predict_from}: {e if isinstance(e, ValueError) else f'missing field {e}'}")
        record = {**record, "predicted_by": "python -m experiments.serving_bench " + " ".join(sys.argv[1:] if argv
                                                                                          is None else argv)}
    else:
        peaks = local_peaks(a.peak_flops, a.peak_bandwidth, a.calibrate)
        record = run(a.layers, a.batch, a.context, a.adapters, a.vera_ranks, a.lora_r, a.lora_adapters, a.targets,
                     a.iters, a.warmup, a.hidden, peaks, a.cache_passes, a.paired)
    text = json.dumps(record, indent=1 if a.predict_from else None)
    if not a.predict_from:
        print(text)
    for name, block in roofline.record_blocks(record).items():
        print(roofline.table(name, block))
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
