"""Scanned vs unrolled layers (`--scan_layers`): compile time and step time of the same model with
its blocks unrolled and under one nn.scan (`scan_layers=True`), at several depths.

Each depth builds one random model (`loader.random_model`); the scanned twin holds the same weights
stacked (`common.stack_layers`), so both compute the same loss (the record keeps the largest
difference as a check). Per depth, the two layouts are timed interleaved (`timing.measure_all`), so
a load spike on a shared machine lands on both. The step is the floor's (frozen model, forward +
backward to the embeddings' output, `steps.floor_loss`) and, when asked, full fine-tuning (the
trainer's step over every leaf): steps that need no adapter on stacked kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import vera_jax
from vera_jax.models import common, loader

from .shapes import FAMILY, hidden_size, make_batch, model_config, shape_summary
from .steps import PATHS, floor_loss, trainer_step
from .timing import machine, measure_all

DEPTHS = (6, 12, 24, 48)
SCAN_METHODS = ("floor", "full")
LAYOUTS = ("unrolled", "scanned")


def _entries(layouts: dict, cfg: dict, methods: list[str], batch: int, seq: int, dtype: str) -> dict:
    ids, labels = make_batch(cfg, batch, seq)
    entries = {}
    for layout, (module, params) in layouts.items():
        for method in methods:
            if method == "floor":
                eps = jnp.zeros((batch, seq, hidden_size(cfg)), jnp.dtype(dtype))
                grad = jax.value_and_grad(floor_loss(module, FAMILY[cfg["model_type"]][0]), argnums=1)
                entries[f"{method}/{layout}"] = (grad, (params, eps, ids, labels), (), 0)
            else:
                step, state, frozen = trainer_step(module, vera_jax.apply_full(params, trainable_extra=()),
                                                   PATHS[method], dtype)
                entries[f"{method}/{layout}"] = (step, (state, frozen, {"ids": ids, "labels": labels}), (0,), 1)
    return entries


def _loss_gap(layouts: dict, cfg: dict, batch: int, seq: int, dtype: str) -> float:
    """|floor loss, scanned - unrolled|: both layouts compute the same function."""
    ids, labels = make_batch(cfg, batch, seq)
    eps = jnp.zeros((batch, seq, hidden_size(cfg)), jnp.dtype(dtype))
    losses = [jax.jit(floor_loss(module, FAMILY[cfg["model_type"]][0]))(params, eps, ids, labels)
              for module, params in layouts.values()]
    return abs(float(losses[1]) - float(losses[0]))


def scan_record(model: str, depths: list[int], hidden: int | None, batch: int, seq: int, iters: int, warmup: int,
                methods: list[str], dtype: str) -> dict:
    """Per depth and method: compile s and step ms of both layouts and their ratios; and how the
    scanned (and unrolled) compile time grows from the shallowest to the deepest depth."""
    unknown = sorted(set(methods) - set(SCAN_METHODS))
    if unknown:
        raise ValueError(f"methods: {unknown} cannot run with --scan_layers; choose from {list(SCAN_METHODS)} "
                         "(adapters on stacked kernels are measured by the adapter benchmark)")
    methods = ["floor"] + [m for m in SCAN_METHODS if m in methods and m != "floor"]
    rows = {}
    for depth in depths:
        cfg = model_config(model, depth, hidden)
        unrolled = loader.random_model(cfg, dtype=dtype)
        layouts = {"unrolled": (unrolled.module, unrolled.params),
                   "scanned": (unrolled.module.clone(scan_layers=True), common.stack_layers(unrolled.params))}
        results = measure_all(_entries(layouts, cfg, methods, batch, seq, dtype), iters, warmup)
        row = {"loss_gap": _loss_gap(layouts, cfg, batch, seq, dtype)}
        for method in methods:
            got = {layout: results[f"{method}/{layout}"] for layout in LAYOUTS}
            row[method] = {
                **{layout: {"compile_s": r["compile_s"], "step_ms": r["step_ms"]} for layout, r in got.items()},
                "step_scanned_vs_unrolled": got["scanned"]["step_ms"] / got["unrolled"]["step_ms"],
                "compile_scanned_vs_unrolled": got["scanned"]["compile_s"] / got["unrolled"]["compile_s"],
            }
        rows[str(depth)] = row
        del unrolled, layouts
    first, last = str(min(depths)), str(max(depths))
    growth = {method: {layout: rows[last][method][layout]["compile_s"] / rows[first][method][layout]["compile_s"]
                       for layout in LAYOUTS} for method in methods}
    shape = {**shape_summary(model_config(model, None, hidden), model), "depths": list(depths), "batch": batch,
             "seq": seq, "tokens": batch * seq, "dtype": dtype, "iters": iters, "warmup": warmup}
    shape.pop("layers")
    return {"mode": "scan", "shape": shape, "methods": methods, "depths": rows,
            "compile_growth": {"from": int(first), "to": int(last), **growth}, "machine": machine()}


def scan_markdown(record: dict) -> str:
    s, m = record["shape"], record["machine"]
    lines = [f"### Scanned vs unrolled layers: {s['model']} shape, hidden {s['hidden']}, batch {s['batch']} x seq "
             f"{s['seq']} = {s['tokens']} tokens/step, {s['dtype']}", "",
             f"{m['jax']}; load average {m['load_avg']} over {m['cpus']} CPUs; median of {s['iters']} steps after "
             f"{s['warmup']} warm-up, both layouts interleaved at each depth", "",
             "| method | layers | unrolled compile s | scanned compile s | scanned / unrolled compile "
             "| unrolled step ms | scanned step ms | scanned / unrolled step | loss gap |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in record["methods"]:
        for depth, row in record["depths"].items():
            r = row[method]
            lines.append(f"| {method} | {depth} | {r['unrolled']['compile_s']:.2f} | {r['scanned']['compile_s']:.2f} "
                         f"| {r['compile_scanned_vs_unrolled']:.3f} | {r['unrolled']['step_ms']:.2f} | "
                         f"{r['scanned']['step_ms']:.2f} | {r['step_scanned_vs_unrolled']:.3f} | "
                         f"{row['loss_gap']:.1e} |")
    g = record["compile_growth"]
    lines.append("")
    for method in record["methods"]:
        lines.append(f"Compile time at {g['to']} layers over {g['from']} ({method}): scanned "
                     f"{g[method]['scanned']:.2f}x, unrolled {g[method]['unrolled']:.2f}x.")
    return "\n".join(lines)
