"""Analyses of trained adapters: the paper's Figure 3 and the authors' reply to reviewers.

1. |d| per layer for each adapted module (query, value): how much of the shared random basis
   each layer uses (the paper's Figure 3: later layers and value matrices use more).
2. Cosine similarity, per layer, between the weight deltas of a LoRA and a VeRA adapter trained
   on the same task, against two random baselines: (a) an i.i.d. Gaussian matrix of the same
   shape, (b) a VeRA delta built from the same A, B with random d, b. Similarity well above both
   says the two methods move the weights the same way.

    python -m experiments.analysis --checkpoint DIR_OR_HUB_ID --num_labels 2 \\
        --vera RUN/adapter [--lora RUN/adapter] [--out runs/analysis]

`--vera` / `--lora` are adapter directories written by `vera_jax.save_adapter` (the GLUE
runner writes one per run). Writes d_magnitudes.{csv,png} and delta_cosine.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import jax
import numpy as np

import vera_jax
from vera_jax.adapters.targets import layer_index
from vera_jax.tree import get_path, set_path


def _by_path(adapted) -> dict[str, vera_jax.LayerSpec]:
    return {s.name: s for s in adapted.layers}


def _module(spec) -> str:
    return spec.path[-1]


def d_magnitudes(adapted) -> list[dict]:
    """One row per adapted layer: layer index, module name, mean and max |d|, mean |b|."""
    if not all({"lambda_d", "lambda_b"} <= set(get_path(adapted.adapter, s.path)) for s in adapted.layers):
        raise ValueError(f"d_magnitudes: expected a VeRA adapter (d and b vectors), got {adapted.method}")
    rows = []
    for spec in adapted.layers:
        vec = get_path(adapted.adapter, spec.path)
        d, b = np.abs(np.asarray(vec["lambda_d"])), np.abs(np.asarray(vec["lambda_b"]))
        rows.append({"layer": layer_index(spec.path, adapted.config.layers_pattern), "module": _module(spec),
                     "path": spec.name, "mean_abs_d": float(d.mean()), "max_abs_d": float(d.max()),
                     "mean_abs_b": float(b.mean())})
    return rows


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float("nan")


def delta_cosines(vera, lora, seed: int = 0) -> list[dict]:
    """Cosine similarity of LoRA's and VeRA's deltas per shared layer, with the two baselines."""
    vera_layers, lora_layers = _by_path(vera), _by_path(lora)
    shared = [name for name in vera_layers if name in lora_layers]
    if not shared:
        raise ValueError(f"delta_cosines: no layer adapted by both (VeRA: {sorted(vera_layers)}, "
                         f"LoRA: {sorted(lora_layers)})")
    rng = np.random.default_rng(seed)
    rows = []
    for name in shared:
        spec = vera_layers[name]
        dv = np.asarray(vera_jax.layer_delta(vera, spec))
        dl = np.asarray(vera_jax.layer_delta(lora, lora_layers[name]))
        random_vectors = {"lambda_d": rng.standard_normal(vera.config.r).astype(np.float32),
                          "lambda_b": rng.standard_normal(spec.out_features).astype(np.float32)}
        tree = jax.tree.map(lambda x: x, vera.adapter)
        set_path(tree, spec.path, random_vectors)
        random_vera = np.asarray(vera_jax.layer_delta(vera.replace(adapter=tree), spec))
        rows.append({
            "layer": layer_index(spec.path, vera.config.layers_pattern), "module": _module(spec), "path": name,
            "cos_lora_vera": _cosine(dl, dv),
            "cos_lora_gaussian": _cosine(dl, rng.standard_normal(dl.shape)),
            "cos_lora_random_vera": _cosine(dl, random_vera),
        })
    return rows


def _write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot_by_layer(rows, value_keys: list[str], path: Path, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for module in sorted({r["module"] for r in rows}):
        points = sorted((r["layer"], r) for r in rows if r["module"] == module and r["layer"] is not None)
        for key in value_keys:
            ax.plot([p[0] for p in points], [p[1][key] for p in points], "o-", label=f"{module}: {key}")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyse(vera, lora=None, out: str | Path = "runs/analysis") -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    magnitudes = d_magnitudes(vera)
    _write_csv(magnitudes, out / "d_magnitudes.csv")
    _plot_by_layer(magnitudes, ["mean_abs_d"], out / "d_magnitudes.png", "mean |d|", "VeRA: |d| per layer")
    written |= {"d_csv": out / "d_magnitudes.csv", "d_png": out / "d_magnitudes.png"}
    if lora is not None:
        cosines = delta_cosines(vera, lora)
        _write_csv(cosines, out / "delta_cosine.csv")
        keys = ["cos_lora_vera", "cos_lora_gaussian", "cos_lora_random_vera"]
        lines = ["| layer | module | " + " | ".join(keys) + " |", "| ---: | --- |" + " ---: |" * len(keys)]
        lines += [f"| {r['layer']} | {r['module']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |"
                  for r in cosines]
        (out / "delta_cosine.md").write_text("\n".join(lines) + "\n")
        _plot_by_layer(cosines, keys, out / "delta_cosine.png", "cosine similarity", "LoRA vs VeRA weight deltas")
        written |= {"cos_csv": out / "delta_cosine.csv", "cos_md": out / "delta_cosine.md",
                    "cos_png": out / "delta_cosine.png"}
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the base model the adapters were trained on")
    parser.add_argument("--num_labels", type=int, default=None, help="classification head size used in training")
    parser.add_argument("--vera", required=True, help="VeRA adapter directory")
    parser.add_argument("--lora", default=None, help="LoRA adapter directory trained on the same task")
    parser.add_argument("--out", default="runs/analysis")
    args = parser.parse_args(argv)
    from vera_jax.models import from_pretrained

    _, params, _ = from_pretrained(args.checkpoint, num_labels=args.num_labels)
    vera = vera_jax.load_adapter(args.vera, params)
    lora = vera_jax.load_adapter(args.lora, params) if args.lora else None
    for name, path in analyse(vera, lora, args.out).items():
        print(f"{name}: {path}")
    if lora is not None:
        print((Path(args.out) / "delta_cosine.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
