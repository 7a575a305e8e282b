"""The paper's appendix experiment "fitting random square matrices".

A random target T (n x n, entries N(0, 1/n)) is fitted by an adapter on a zero kernel, through
the library itself: `merge(apply_lora(...))` / `merge(apply_vera(...))` on params
{"layer_0": {"target": {"kernel": 0}}}, Adam on the trainable leaves only, loss
||W_eff - T||_F^2 / ||T||_F^2. LoRA runs at ranks 1..k, VeRA at several ranks r (vectors d and b
only: r + n parameters, so VeRA can go below rank-1 LoRA's 2n). For LoRA the best possible error
at rank k is known in closed form (truncated SVD, Eckart-Young) and is reported beside the
trained one, which tells whether the optimizer, not the parametrisation, limits a row.

    python -m experiments.expressivity [--config configs/expressivity.py] [--config.n=64] [--workdir DIR]

Writes DIR/expressivity.csv, DIR/expressivity.md and DIR/expressivity.png.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

import vera_jax


def _target(n: int, seed: int) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (n, n), jnp.float32) / jnp.sqrt(n)


def _fit(adapted, target: jax.Array, steps: int, lr: float) -> float:
    """Adam on the trainable leaves; returns the final relative squared Frobenius error."""
    trainable, frozen = vera_jax.partition(adapted)
    norm = jnp.sum(target**2)

    def loss(t):
        kernel = vera_jax.merge(vera_jax.combine(t, frozen))["layer_0"]["target"]["kernel"]
        return jnp.sum((kernel - target) ** 2) / norm

    tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))

    @jax.jit
    def run(t):
        def step(carry, _):
            t, state = carry
            value, grads = jax.value_and_grad(loss)(t)
            updates, state = tx.update(grads, state, t)
            return (optax.apply_updates(t, updates), state), value

        (t, _), _ = jax.lax.scan(step, (t, tx.init(t)), None, length=steps)
        return loss(t)

    return float(run(trainable))


def _svd_error(target: np.ndarray, rank: int) -> float:
    s = np.linalg.svd(np.asarray(target, np.float64), compute_uv=False)
    return float(np.sum(s[rank:] ** 2) / np.sum(s**2))


def run(config, workdir: str | Path) -> list[dict]:
    """Fits every (method, rank, seed) of the config; writes the CSV, table and plot."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    jobs = [("lora", r, s) for r in config.lora_ranks for s in range(config.num_seeds)]
    jobs += [("vera", r, s) for r in config.vera_ranks for s in range(config.num_seeds)]
    rows = []
    for method, rank, seed in tqdm(jobs, desc="fitting", unit="fit"):
        target = _target(config.n, 1000 + seed)
        params = {"layer_0": {"target": {"kernel": jnp.zeros((config.n, config.n), jnp.float32)}}}
        if method == "lora":
            adapted = vera_jax.apply_lora(params,
                                          vera_jax.LoraConfig(r=rank, alpha=rank, targets=("target",), seed=seed))
            lr = config.lora_lr
        else:
            adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=rank, targets=("target",), seed=seed,
                                                                      d_initial=config.d_initial))
            lr = config.vera_lr
        start = time.perf_counter()
        error = _fit(adapted, target, config.steps, lr)
        rows.append({
            "method": method, "rank": rank, "seed": seed, "params": vera_jax.count_trainable(adapted),
            "rel_error": error, "svd_optimum": _svd_error(target, rank) if method == "lora" else "",
            "seconds": round(time.perf_counter() - start, 2),
        })
    _write(rows, workdir, config)
    return rows


def _median_rows(rows: list[dict]) -> list[dict]:
    out = []
    for method, rank in dict.fromkeys((r["method"], r["rank"]) for r in rows):
        group = [r for r in rows if r["method"] == method and r["rank"] == rank]
        svd = [r["svd_optimum"] for r in group if r["svd_optimum"] != ""]
        out.append({"method": method, "rank": rank, "params": group[0]["params"],
                    "rel_error": float(np.median([r["rel_error"] for r in group])),
                    "svd_optimum": float(np.median(svd)) if svd else None})
    return sorted(out, key=lambda r: (r["params"], r["method"]))


def _write(rows: list[dict], workdir: Path, config) -> None:
    with open(workdir / "expressivity.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    medians = _median_rows(rows)
    lines = [f"Fitting a random {config.n}x{config.n} matrix (median of {config.num_seeds} seeds, "
             f"{config.steps} Adam steps); error = ||W - T||_F^2 / ||T||_F^2", "",
             "| method | rank | trainable params | rel. error | LoRA SVD optimum |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in medians:
        svd = "" if r["svd_optimum"] is None else f"{r['svd_optimum']:.4f}"
        lines.append(f"| {r['method']} | {r['rank']} | {r['params']} | {r['rel_error']:.4f} | {svd} |")
    (workdir / "expressivity.md").write_text("\n".join(lines) + "\n")
    (workdir / "expressivity.json").write_text(
        json.dumps({"config": config.to_dict(), "medians": medians}, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, style in (("lora", "o-"), ("vera", "s-")):
        pts = [r for r in medians if r["method"] == method]
        ax.plot([r["params"] for r in pts], [r["rel_error"] for r in pts], style, label=method.upper())
    svd = [r for r in medians if r["svd_optimum"] is not None]
    ax.plot([r["params"] for r in svd], [r["svd_optimum"] for r in svd], "k:", label="LoRA optimum (SVD)")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("relative squared error")
    ax.set_title(f"Fitting a random {config.n}x{config.n} matrix")
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "expressivity.png", dpi=120)
    plt.close(fig)


def main() -> None:
    """CLI; flags are defined here, not at import, so importing this module (tests, notebooks)
    does not clash with other experiments' absl flags."""
    config = config_flags.DEFINE_config_file("config", str(Path(__file__).parents[1] / "configs" / "expressivity.py"))
    workdir = flags.DEFINE_string("workdir", "runs/expressivity", "where the CSV, markdown table and plot go")

    def run_main(argv):
        del argv
        rows = run(config.value, workdir.value)
        print((Path(workdir.value) / "expressivity.md").read_text())
        print(f"{len(rows)} fits; wrote {workdir.value}/expressivity.{{csv,md,json,png}}")

    app.run(run_main)


if __name__ == "__main__":
    main()
