"""The paper's Appendix C comparison on a quantized base: VeRA against LoRA, both at r=64 (and VeRA
at r=1024), every linear layer but lm_head adapted, on a Llama-shaped model whose frozen kernels
are NF4 (QLoRA's) or int8 (`vera_jax.quant`), beside the same step on the float32 base. Each row is
the trainer's own step (`vera_jax.train.make_train_step`, factored path: nothing merges into a
quantized kernel) with its median step time and XLA's memory figures; ratios VeRA / LoRA per base.
Prints the JSON record on one line.

    python -m experiments.benchmark.quantized --layers=2 --hidden=384 --vocab=8000 --batch=4 --seq=128
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
from absl import app, flags

import vera_jax
from vera_jax import quant
from vera_jax.models import llama

from .shapes import LLAMA_SMALL, make_batch
from .steps import trainer_step
from .timing import machine, measure

TARGETS = ("query", "key", "value", "attn_out", "gate", "up", "down")  # every linear layer but lm_head

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 2, "decoder layers", lower_bound=1)
flags.DEFINE_integer("hidden", 384, "width (heads of 64, half as many kv heads, MLP 8/3 x rounded to 64)",
                     lower_bound=64)
flags.DEFINE_integer("vocab", 8000, "vocabulary size", lower_bound=16)
flags.DEFINE_integer("batch", 4, "sequences per step", lower_bound=1)
flags.DEFINE_integer("seq", 128, "tokens per sequence", lower_bound=2)
flags.DEFINE_integer("iters", 5, "timed steps (the median is reported)", lower_bound=1)
flags.DEFINE_integer("warmup", 1, "untimed steps before them", lower_bound=0)
flags.DEFINE_list("bases", ["float32", "nf4"], "frozen bases: float32, nf4, int8")
flags.DEFINE_list("runs", ["vera:64", "lora:64", "vera:1024"], "method:rank pairs (vera or lora)")


def llama_config(layers: int, hidden: int, vocab: int) -> dict:
    """LLAMA_SMALL's layout at this size; the MLP width a multiple of 64 so NF4's blocks fit."""
    if hidden % 64:
        raise ValueError(f"hidden: {hidden} must be a multiple of 64 (heads of 64)")
    heads = hidden // 64
    return {**LLAMA_SMALL, "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2), "intermediate_size": -(-8 * hidden // 3 // 64) * 64,
            "vocab_size": vocab}


def adapter(method: str, r: int, params) -> vera_jax.Adapted:
    if method == "vera":
        return vera_jax.apply_vera(params, vera_jax.VeraConfig(r=r, targets=TARGETS))
    if method == "lora":
        return vera_jax.apply_lora(params, vera_jax.LoraConfig(r=r, alpha=r, targets=TARGETS))
    raise ValueError(f"runs: method {method!r} is not one of ['vera', 'lora']")


def benchmark(cfg: dict, bases: list[str], runs: list[tuple[str, int]], batch: int, seq: int, iters: int,
              warmup: int) -> dict:
    model = llama.build(cfg)
    ids, labels = make_batch(cfg, batch, seq)
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), ids[:1, :2]))["params"])()
    rows = []
    for base in bases:
        if base not in ("float32", *quant.METHODS):
            raise ValueError(f"bases: {base!r} is not one of {['float32', *quant.METHODS]}")
        frozen_params = params if base == "float32" else quant.quantize_params(params, base)
        for method, r in runs:
            adapted = adapter(method, r, frozen_params)
            step, state, frozen = trainer_step(model, adapted, "factored", "float32")
            res = measure(step, (state, frozen, {"ids": ids, "labels": labels}), iters, warmup, donate=(0,), carry=1)
            rows.append({"base": base, "method": method, "r": r, **res,
                         "trainable": vera_jax.count_trainable(adapted), **quant.param_bytes(frozen_params)})
            del state, frozen
    ratios = {}
    for base in bases:
        by = {(row["method"], row["r"]): row for row in rows if row["base"] == base}
        lora = by.get(("lora", 64))
        for (method, r), row in by.items():
            if method == "vera" and lora is not None:
                ratios[f"{base}/vera_r{r}_over_lora_r64"] = {
                    "step_time": row["step_ms"] / lora["step_ms"],
                    "peak_estimate": row["memory"]["peak_estimate"] / lora["memory"]["peak_estimate"]}
    return {"model": {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")},
            "batch": batch, "seq": seq, "targets": list(TARGETS), "path": "factored", "rows": rows,
            "ratios": ratios, "machine": machine()}


def main(argv):
    del argv
    runs = []
    for item in FLAGS.runs:
        method, _, r = item.partition(":")
        if not r.isdigit():
            raise app.UsageError(f"--runs: {item!r} is not method:rank (e.g. vera:64)")
        runs.append((method, int(r)))
    record = benchmark(llama_config(FLAGS.layers, FLAGS.hidden, FLAGS.vocab), FLAGS.bases, runs, FLAGS.batch,
                       FLAGS.seq, FLAGS.iters, FLAGS.warmup)
    print(json.dumps(record))


if __name__ == "__main__":
    app.run(main)
