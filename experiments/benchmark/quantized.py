"""The paper's Appendix C comparison on a quantized base: VeRA against LoRA, both at r=64 (and VeRA
at r=1024), every linear layer but lm_head adapted, on a Llama-shaped model whose frozen kernels
are NF4 (QLoRA's) or int8 (`vera_jax.quant`), beside the same step on the float32 base. Each row is
the trainer's own step (`vera_jax.train.make_train_step`, factored path: nothing merges into a
quantized kernel) with its median step time, XLA's FLOP count and memory figures. Per base a
floor row (the frozen model's forward + backward to the embeddings, no adapter) gives the
arithmetic minimum beside each step, as in the main benchmark. All rows of a run are timed
interleaved (one step of each per round), so load on a shared machine hits them alike; ratios
VeRA / LoRA r=64 per base. Prints the JSON record on one line.

    python -m experiments.benchmark.quantized --layers=2 --hidden=384 --vocab=8000 --batch=4 --seq=128
    python -m experiments.benchmark.quantized --model=llama-7b --layers=4 --dtype=bfloat16 --seq=512   # a GPU
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

import vera_jax
from vera_jax import quant, train
from vera_jax.models import hub, loader

from .report import add_minimum
from .shapes import LLAMA_SMALL, make_batch
from .steps import extra_flops, floor_loss, trainer_step
from .timing import count_all, machine, measure_all

TARGETS = ("query", "key", "value", "attn_out", "gate", "up", "down")  # every linear layer but lm_head
MODELS = ("small", "llama-7b", "llama-13b", "llama-2-7b", "llama-2-13b")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags, defined only when this module runs as the program (the main benchmark's
    module defines flags of the same names, and tests import both)."""
    flags.DEFINE_enum("model", "small", MODELS, "small: LLaMA's layout at --hidden/--vocab; otherwise a released "
                      "model's exact width (bundled config), depth from --layers")
    flags.DEFINE_integer("layers", 2, "decoder layers", lower_bound=1)
    flags.DEFINE_integer("hidden", 384, "width of the small model (heads of 64, half as many kv heads, MLP 8/3 x "
                         "rounded to 64)", lower_bound=64)
    flags.DEFINE_integer("vocab", 8000, "vocabulary size of the small model", lower_bound=16)
    flags.DEFINE_integer("batch", 4, "sequences per step", lower_bound=1)
    flags.DEFINE_integer("seq", 128, "tokens per sequence", lower_bound=2)
    flags.DEFINE_integer("iters", 5, "timed steps (the median is reported)", lower_bound=1)
    flags.DEFINE_integer("warmup", 1, "untimed steps before them", lower_bound=0)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype (the trainer's compute_dtype; "
                      "quantized kernels dequantize to it)")
    flags.DEFINE_list("bases", ["float32", "nf4"], "frozen bases: float32, nf4, int8")
    flags.DEFINE_bool("count_only", False, "XLA's FLOPs and the minimum per row on abstract weights, nothing run")
    flags.DEFINE_list("runs", ["vera:64", "lora:64", "vera:1024"], "method:rank pairs (vera or lora)")


def llama_config(layers: int, hidden: int, vocab: int) -> dict:
    """LLAMA_SMALL's layout at this size; the MLP width a multiple of 64 so NF4's blocks fit."""
    if hidden % 64:
        raise ValueError(f"hidden: {hidden} must be a multiple of 64 (heads of 64)")
    heads = hidden // 64
    return {**LLAMA_SMALL, "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2), "intermediate_size": -(-8 * hidden // 3 // 64) * 64,
            "vocab_size": vocab}


def model_config(model: str, layers: int, hidden: int, vocab: int) -> dict:
    """The small model, or a released Llama's config (shipped with vera_jax) at `layers` deep."""
    if model == "small":
        return llama_config(layers, hidden, vocab)
    if model not in MODELS:
        raise ValueError(f"model: {model!r} is not one of {list(MODELS)}")
    return {**hub.bundled_config(model), "num_hidden_layers": layers}


ADAPTERS = {"vera": lambda r: vera_jax.VeraConfig(r=r, targets=TARGETS),
            "lora": lambda r: vera_jax.LoraConfig(r=r, alpha=r, targets=TARGETS)}  # the runs' configs at rank r


def adapter(method: str, r: int, params) -> vera_jax.Adapted:
    if method not in ADAPTERS:
        raise ValueError(f"runs: method {method!r} is not one of {list(ADAPTERS)}")
    return vera_jax.attach(params, ADAPTERS[method](r))


def quantized_floor(model: nn.Module, dtype: str):
    """The floor's `(params, eps, ids, labels) -> (loss, d loss / d eps)` on a base that may hold
    quantized kernels (dequantized per layer, to the compute dtype, as the trainer runs them)."""
    loss = floor_loss(model, "embed_tokens")

    def fn(params, eps, ids, labels):
        with quant.maybe_dequantized(params):
            return loss(train.cast_params(params, dtype), eps, ids, labels)

    return jax.value_and_grad(fn, argnums=1)


def benchmark(cfg: dict, bases: list[str], runs: list[tuple[str, int]], batch: int, seq: int, iters: int,
              warmup: int, dtype: str = "float32", count_only: bool = False) -> dict:
    """The record; count_only: XLA's FLOPs and the minimum per row on abstract weights, nothing
    run (a GPU run's shape counted on a CPU; rows without timings or memory)."""
    loaded = loader.random_model(cfg, abstract=count_only)
    model, params = loaded.module, loaded.params
    ids, labels = make_batch(cfg, batch, seq)
    entries, meta = {}, {}
    for base in bases:
        if base not in ("float32", *quant.METHODS):
            raise ValueError(f"bases: {base!r} is not one of {['float32', *quant.METHODS]}")
        frozen_params = params if base == "float32" else (
            jax.eval_shape(lambda p, b=base: quant.quantize_params(p, b), params) if count_only
            else quant.quantize_params(params, base))
        eps = jnp.zeros((batch, seq, cfg["hidden_size"]), jnp.dtype(dtype))
        entries[(base, "floor", 0)] = (quantized_floor(model, dtype), (frozen_params, eps, ids, labels), (), 0)
        sizes = {} if count_only else quant.param_bytes(frozen_params)
        meta[(base, "floor", 0)] = {"trainable": 0, "extra_flops_min": 0.0, **sizes}
        for method, r in runs:
            adapted = adapter(method, r, frozen_params)
            step, state, frozen = trainer_step(model, adapted, "factored", dtype)
            entries[(base, method, r)] = (step, (state, frozen, {"ids": ids, "labels": labels}), (0,), 1)
            meta[(base, method, r)] = {"trainable": vera_jax.count_trainable(adapted),
                                       "extra_flops_min": extra_flops(adapted, "factored", batch * seq), **sizes}
    measured = count_all(entries) if count_only else measure_all(entries, iters, warmup)
    rows = []
    for base in bases:
        group = {key[1:]: {**measured[key], **meta[key]} for key in entries if key[0] == base}
        floor = group[("floor", 0)]
        for res in group.values():
            if not count_only:
                res["step_vs_floor"] = res["step_ms"] / floor["step_ms"]
        add_minimum({"floor": floor, **{f"{m}:{r}": res for (m, r), res in group.items() if m != "floor"}})
        rows += [{"base": base, "method": m, "r": r, **res} for (m, r), res in group.items()]
    ratios = {}
    for base in bases:
        by = {(row["method"], row["r"]): row for row in rows if row["base"] == base}
        lora = by.get(("lora", 64))
        for (method, r), row in by.items():
            if method == "vera" and lora is not None and not count_only:
                ratios[f"{base}/vera_r{r}_over_lora_r64"] = {
                    "step_time": row["step_ms"] / lora["step_ms"],
                    "peak_estimate": row["memory"]["peak_estimate"] / lora["memory"]["peak_estimate"]}
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    return {"mode": "count" if count_only else "benchmark", "model": {k: cfg[k] for k in keys}, "batch": batch,
            "seq": seq, "dtype": dtype, "targets": list(TARGETS), "path": "factored", "iters": iters,
            "warmup": warmup, "rows": rows, "ratios": ratios, "machine": machine()}


def main(argv):
    del argv
    runs = []
    for item in FLAGS.runs:
        method, _, r = item.partition(":")
        if not r.isdigit():
            raise app.UsageError(f"--runs: {item!r} is not method:rank (e.g. vera:64)")
        runs.append((method, int(r)))
    record = benchmark(model_config(FLAGS.model, FLAGS.layers, FLAGS.hidden, FLAGS.vocab), FLAGS.bases, runs,
                       FLAGS.batch, FLAGS.seq, FLAGS.iters, FLAGS.warmup, FLAGS.dtype, FLAGS.count_only)
    print(json.dumps(record))


if __name__ == "__main__":
    define_flags()
    app.run(main)
