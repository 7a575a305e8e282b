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
Beside each measured ratio it puts the FLOP ratio the cost model predicts: base FLOPs per token
(every matmul, attention over the context, the LM head) over base + adapter-term FLOPs. The
record says how many bytes each adapter holds on device and how many were resident.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vera_jax.adapters.config import VeraConfig
from vera_jax.adapters.targets import find_targets
from vera_jax.models import gpt2, hub
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
        specs = {s.path: s for s in self.layers}
        ids = rows[:, 0]

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            spec = specs.get(tuple(module.scope.path)) if context.method_name == "__call__" and module.scope else None
            out = next_fun(*args, **kwargs)
            if spec is None:
                return out
            a, b = prepared["A"][spec.name][ids], prepared["B"][spec.name][ids]
            h = jnp.einsum("bti,bri->btr", args[0].astype(jnp.float32), a)
            return out + (jnp.einsum("btr,bor->bto", h, b) * self.scaling).astype(out.dtype)

        with nn.intercept_methods(interceptor):
            return self.model.apply({"params": prepared["base"]}, input_ids, attention_mask=attention_mask,
                                    cache=cache)


def base_flops(cfg: dict, context: int) -> float:
    """FLOPs per decoded token of the GPT-2 model: matmuls, attention over the context, LM head."""
    w, layers = cfg["n_embd"], cfg["n_layer"]
    inner = cfg.get("n_inner") or 4 * w
    per_layer = 4 * w * w + 2 * w * inner + 2 * context * w
    return 2.0 * (layers * per_layer + w * cfg["vocab_size"])


def time_step(decoder, arrays, cache, rows, batch, iters, warmup) -> float:
    """Median seconds of one jitted decode step."""
    mask = jnp.ones((batch, cache["layer_0"]["key"].shape[1]), jnp.int32)
    tokens = jnp.arange(batch, dtype=jnp.int32)[:, None] % 50000 + 1

    @jax.jit
    def step(arrays, cache, rows):
        logits, _ = decoder.apply(arrays, tokens, mask, cache, rows)
        return jnp.argmax(logits[:, -1], axis=-1)

    for _ in range(warmup):
        step(arrays, cache, rows).block_until_ready()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step(arrays, cache, rows).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row_ids(n: int, batch: int, rng) -> np.ndarray:
    """(batch, 1) rows 1..n: all distinct when n >= batch, else row i -> 1 + i mod n."""
    ids = rng.choice(n, batch, replace=False) if n >= batch else np.arange(batch) % n
    return (ids + 1).astype(np.int32)[:, None]


def run(layers, batch, context, adapters, vera_ranks, lora_r, lora_adapters, targets, iters, warmup,
        hidden=None) -> dict:
    cfg = {**hub.bundled_config("gpt2-medium"), "n_layer": layers}
    if hidden:
        cfg.update(n_embd=hidden, n_head=max(1, hidden // 64))
    model = gpt2.build(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    cache = model.init_cache(batch, context + 8)
    cache = {**cache, "index": jnp.full((batch,), context, jnp.int32)}
    rng = np.random.RandomState(0)
    key = jax.random.key(1)
    base = base_flops(cfg, context)
    merged_s = time_step(ModelDecoder(model), params, cache, None, batch, iters, warmup)
    record = {"model": "gpt2-medium", "layers_run": layers, "layers_real": 24, "width": cfg["n_embd"],
              "note": "random weights; depth cut to fit the machine; widths, heads and vocab are GPT-2-medium's",
              "device": jax.devices()[0].device_kind, "batch": batch, "context": context, "targets": targets,
              "merged": {"tokens_per_s": batch / merged_s, "step_s": merged_s, "flops_per_token": base},
              "vera": [], "lora": []}
    for r in vera_ranks:
        specs = find_targets(params, VeraConfig(r=r, targets=tuple(targets)))
        in_max, out_max = max(s.in_features for s in specs), max(s.out_features for s in specs)
        term = sum(2.0 * r * (s.in_features + s.out_features) for s in specs)
        per_adapter = sum((r + s.out_features) * 4 for s in specs)
        first = None
        for n in adapters:
            k = jax.random.fold_in(key, n * 7919 + r)
            group = {"A": jax.random.normal(k, (r, in_max)) * 0.03, "B": jax.random.normal(k, (out_max, r)) * 0.03,
                     "d": {s.name: jax.random.normal(jax.random.fold_in(k, i), (n + 1, r))
                           for i, s in enumerate(specs)},
                     "b": {s.name: jax.random.normal(jax.random.fold_in(k, 99 + i), (n + 1, s.out_features)) * 0.01
                           for i, s in enumerate(specs)}}
            decoder = BankDecoder(model, (("bench", specs),))
            step_s = time_step(decoder, {"base": params, "groups": [group]}, cache, row_ids(n, batch, rng), batch,
                               iters, warmup)
            first = first or step_s
            record["vera"].append({
                "r": r, "adapters": n, "distinct_in_batch": min(n, batch), "tokens_per_s": batch / step_s,
                "step_s": step_s, "vs_1_adapter": first / step_s, "vs_merged": merged_s / step_s,
                "flop_ratio_vs_merged": base / (base + term), "bytes_per_adapter": per_adapter,
                "resident_adapter_bytes": per_adapter * n,
                "shared_projection_bytes": 4 * r * (in_max + out_max)})
            del group
    specs = find_targets(params, VeraConfig(r=lora_r, targets=tuple(targets)))
    term = sum(2.0 * lora_r * (s.in_features + s.out_features) for s in specs)
    first = None
    for n in lora_adapters:
        k = jax.random.fold_in(key, n)
        arrays = {"base": params,
                  "A": {s.name: jax.random.normal(k, (n + 1, lora_r, s.in_features)) * 0.03 for s in specs},
                  "B": {s.name: jax.random.normal(k, (n + 1, s.out_features, lora_r)) * 0.03 for s in specs}}
        step_s = time_step(LoraGatherDecoder(model, specs), arrays, cache, row_ids(n, batch, rng), batch, iters,
                           warmup)
        first = first or step_s
        per_adapter = sum(lora_r * (s.in_features + s.out_features) * 4 for s in specs)
        record["lora"].append({
            "r": lora_r, "adapters": n, "distinct_in_batch": min(n, batch), "tokens_per_s": batch / step_s,
            "step_s": step_s, "vs_1_adapter": first / step_s, "vs_merged": merged_s / step_s,
            "flop_ratio_vs_merged": base / (base + term), "bytes_per_adapter": per_adapter,
            "resident_adapter_bytes": per_adapter * n})
        del arrays
    return record


def parse_args(argv=None) -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m experiments.serving_bench", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2, help="GPT-2-medium depth actually run (24 in the real model)")
    p.add_argument("--hidden", type=int, default=None, help="override the width (one head per 64); quick checks")
    p.add_argument("--batch", type=int, default=16, help="rows decoded per step")
    p.add_argument("--context", type=int, default=128, help="tokens already in every row's cache")
    p.add_argument("--adapters", type=ints, default=[1, 16, 256, 1000, 10000], help="N adapters, comma-separated")
    p.add_argument("--vera_ranks", type=ints, default=[256, 1024], help="VeRA ranks")
    p.add_argument("--lora_r", type=int, default=8, help="LoRA rank of the per-row gathered baseline")
    p.add_argument("--lora_adapters", type=ints, default=[1, 16, 256, 1000],
                   help="N for LoRA (its stacks hold r*(in+out) per layer per adapter)")
    p.add_argument("--targets", type=lambda t: t.split(","), default=["query", "value"], help="adapted modules")
    p.add_argument("--iters", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps")
    p.add_argument("--json", default=None, help="also write the record here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    record = run(a.layers, a.batch, a.context, a.adapters, a.vera_ranks, a.lora_r, a.lora_adapters, a.targets,
                 a.iters, a.warmup, a.hidden)
    text = json.dumps(record)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
