"""Where the cost model's merged/factored choice flips, measured: one Dense layer of the model's
width, VeRA at several ranks and token counts, the merged against the factored gradient step
(w.r.t. the adapter vectors and the input, as inside a model), next to `vera_jax.choose_path`."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

import vera_jax

from .shapes import hidden_size, model_config
from .timing import machine, measure


class OneLayer(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, name="dense")(x)


def crossover(width: int, ranks: list[int], tokens_list: list[int], iters: int, warmup: int, dtype: str) -> list[dict]:
    """Merged vs factored gradient step of one adapted (width, width) Dense, against the cost model."""
    jdtype = jnp.dtype(dtype)
    model = OneLayer(width)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, width), jdtype)))["params"]
    params = jax.tree.map(lambda p: p.astype(jdtype), params)
    rows = []
    for r in ranks:
        adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=r, targets=("dense",), d_initial=0.1))
        trainable, frozen = vera_jax.partition(adapted)
        for tokens in tokens_list:
            x = jax.random.normal(jax.random.key(1), (tokens, width), jdtype)
            floor = measure(jax.grad(lambda x: jnp.mean(model.apply({"params": params}, x).astype(jnp.float32) ** 2)),
                            (x,), iters, warmup)
            row = {"r": r, "tokens": tokens, "width": width, "floor_ms": floor["step_ms"]}
            for path in ("merged", "factored"):
                def loss(t, x, path=path, frozen=frozen):
                    y = vera_jax.apply_adapted(model, vera_jax.combine(t, frozen), x, path=path)
                    return jnp.mean(y.astype(jnp.float32) ** 2)

                row[f"{path}_ms"] = measure(jax.grad(loss, argnums=(0, 1)), (trainable, x), iters, warmup)["step_ms"]
            costs = vera_jax.layer_costs(tokens, width, width, r)
            row["measured"] = "merged" if row["merged_ms"] <= row["factored_ms"] else "factored"
            row["predicted"] = vera_jax.choose_path(tokens, width, width, r)
            row["measured_ratio"] = row["merged_ms"] / row["factored_ms"]
            row["predicted_ratio"] = costs["merged"] / costs["factored"]
            rows.append(row)
    return rows


def predicted_crossover_tokens(width: int, r: int) -> int | None:
    """Fewest tokens from which the cost model picks merged for a VeRA (width, width) layer."""
    # merged <= factored  <=>  tokens * w^2 + 3 w^2 r <= tokens * r * (2w + 3w)  (square layer)
    slope = 5 * r * width - width * width
    return None if slope <= 0 else math.ceil(3 * width * width * r / slope)


def crossover_markdown(record: dict) -> str:
    lines = [f"### crossover: one VeRA Dense ({record['width']} x {record['width']}), gradient step "
             f"w.r.t. d, b and the input, {record['dtype']}",
             "",
             f"{record['machine']['jax']}; load average {record['machine']['load_avg']} over "
             f"{record['machine']['cpus']} CPUs; median of {record['iters']} after {record['warmup']} warm-up",
             "",
             "| r | tokens | frozen ms | merged ms | factored ms | merged/factored measured | predicted "
             "| faster measured | predicted | agree |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in record["rows"]:
        lines.append(f"| {x['r']} | {x['tokens']} | {x['floor_ms']:.3f} | {x['merged_ms']:.3f} | "
                     f"{x['factored_ms']:.3f} | {x['measured_ratio']:.2f} | {x['predicted_ratio']:.2f} | "
                     f"{x['measured']} | {x['predicted']} | {'yes' if x['measured'] == x['predicted'] else 'NO'} |")
    lines += ["", "Cost-model crossover (merged from this many tokens on): "
              + ", ".join(f"r={r}: {'never' if t is None else t}" for r, t in record["predicted_crossover"].items())]
    return "\n".join(lines)


def crossover_record(model: str, hidden: int | None, ranks: list[int], tokens: list[int], iters: int, warmup: int,
                     dtype: str) -> dict:
    """The sweep at the width of `model` (or `hidden`), as a JSON-ready record."""
    width = hidden_size(model_config(model, hidden=hidden))
    return {"mode": "crossover", "model": model, "width": width, "dtype": dtype, "iters": iters, "warmup": warmup,
            "rows": crossover(width, ranks, tokens, iters, warmup, dtype),
            "predicted_crossover": {str(r): predicted_crossover_tokens(width, r) for r in ranks},
            "machine": machine()}
