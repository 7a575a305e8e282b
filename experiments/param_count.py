"""Trainable parameter counts of VeRA and LoRA for every model size in the VeRA paper.

    python -m experiments.param_count           # markdown table
    python -m experiments.param_count --json

Each model is built from its HF config fields alone (bundled in vera_jax/models/configs/)
with `jax.eval_shape`, so nothing is downloaded or allocated; the adapter is attached by
`vera_jax.apply_vera` / `apply_lora` (also under eval_shape) and counted with
`vera_jax.count_trainable`. Classification heads are excluded (base architectures, no
`trainable_extra`). Per adapted layer with kernel (d_in, d_out): VeRA trains d_out + r,
LoRA r * (d_in + d_out).

Ranks and targets (VeRA: Kopiczko, Blankevoort, Asano, "VeRA: Vector-based Random Matrix
Adaptation", ICLR 2024; LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022):

* GLUE, RoBERTa-base / -large (VeRA Table 1): VeRA r=1024 / r=256 on query and value;
  LoRA r=8 on query and value (LoRA paper's GLUE setup).
* E2E, GPT-2 medium / large (VeRA Table 2): VeRA r=1024 on query and value; LoRA r=4 on
  query and value (LoRA paper Table 3 / Section 6).
* Image classification, ViT-B/16 / ViT-L/16 (VeRA Table 4): VeRA r=256, LoRA r=8, both
  on query and value.
* Instruction tuning, LLaMA and Llama 2 7B / 13B (VeRA Section 4.3, Table 5): all linear
  layers except the top one (the LM head), i.e. q, k, v, o, gate, up, down projections;
  VeRA r=1024, LoRA r=64.

The `reported` column is the count printed in the VeRA paper's tables. The computed counts
equal it everywhere except LoRA on GPT-2, where the paper copies the LoRA paper's 0.35M /
0.77M while r=4 on separate query and value layers gives 0.39M / 0.74M.

Models the paper predates (Gemma 3 1B / 4B (its language model), Qwen2.5-7B, Llama-3.1-8B; no
`reported` count) at the paper's two settings: query and value (VeRA r=1024, LoRA r=8) and every
linear layer but the LM head (VeRA r=1024, LoRA r=64).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys

import flax.linen as nn
import jax

import vera_jax
from vera_jax.models import hub

QV = ("query", "value")
LLAMA_ALL = ("query", "key", "value", "attn_out", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class Row:
    model: str
    config: str  # bundled config name (vera_jax/models/configs/<config>.json)
    method: str  # "vera" | "lora"
    r: int
    targets: tuple[str, ...]
    reported: str  # as printed in the VeRA paper


def _pair(model, config, vera_r, lora_r, targets, vera_reported, lora_reported):
    return [Row(model, config, "vera", vera_r, targets, vera_reported),
            Row(model, config, "lora", lora_r, targets, lora_reported)]


ROWS = [
    *_pair("RoBERTa-base", "roberta-base", 1024, 8, QV, "0.043M", "0.3M"),
    *_pair("RoBERTa-large", "roberta-large", 256, 8, QV, "0.061M", "0.8M"),
    *_pair("GPT-2 medium", "gpt2-medium", 1024, 4, QV, "0.098M", "0.35M"),
    *_pair("GPT-2 large", "gpt2-large", 1024, 4, QV, "0.17M", "0.77M"),
    *_pair("ViT-B/16", "vit-base-patch16-224-in21k", 256, 8, QV, "24.6K", "294.9K"),
    *_pair("ViT-L/16", "vit-large-patch16-224-in21k", 256, 8, QV, "61.4K", "786.4K"),
    *_pair("LLaMA-7B", "llama-7b", 1024, 64, LLAMA_ALL, "1.6M", "159.9M"),
    *_pair("LLaMA-13B", "llama-13b", 1024, 64, LLAMA_ALL, "2.4M", "250.3M"),
    *_pair("Llama-2-7B", "llama-2-7b", 1024, 64, LLAMA_ALL, "1.6M", "159.9M"),
    *_pair("Llama-2-13B", "llama-2-13b", 1024, 64, LLAMA_ALL, "2.4M", "250.3M"),
]
for _model, _config in [("Gemma-3-1B", "gemma-3-1b"), ("Gemma-3-4B", "gemma-3-4b"), ("Qwen2.5-7B", "qwen2.5-7b"),
                        ("Llama-3.1-8B", "llama-3.1-8b")]:
    ROWS += [*_pair(_model, _config, 1024, 8, QV, "", ""), *_pair(_model, _config, 1024, 64, LLAMA_ALL, "", "")]


@functools.lru_cache(maxsize=None)
def abstract_params(config_name: str) -> dict:
    """Param tree of ShapeDtypeStructs for a bundled config's base architecture."""
    hf_config = hub.bundled_config(config_name)
    fam = hub.family(hf_config["model_type"])
    model = fam.build(hf_config)
    variables = jax.eval_shape(model.init, jax.random.key(0), *fam.dummy_inputs(hf_config))
    return nn.unbox(variables)["params"]


def count(params: dict, row: Row) -> dict:
    """Adapted-layer count and trainable parameters for one row."""
    fields = {"r": row.r, "targets": row.targets}
    if "alpha" in vera_jax.get_method(row.method).config_class.field_names():
        fields["alpha"] = row.r  # LoRA at scale 1
    config = vera_jax.get_method(row.method).config_class(**fields)
    adapted = jax.eval_shape(lambda p: vera_jax.attach(p, config), params)
    return {"layers": len(adapted.layers), "trainable": vera_jax.count_trainable(adapted)}


def table() -> list[dict]:
    return [{"model": row.model, "config": row.config, "method": row.method, "r": row.r,
             "targets": list(row.targets), **count(abstract_params(row.config), row), "reported": row.reported}
            for row in ROWS]


def _human(n: int) -> str:
    return f"{n / 1e6:.3f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def markdown(rows: list[dict]) -> str:
    lines = ["| model | method | r | targets | adapted layers | trainable | ≈ | reported |",
             "|---|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['model']} | {x['method']} | {x['r']} | {','.join(x['targets'])} | {x['layers']} "
                     f"| {x['trainable']:,} | {_human(x['trainable'])} | {x['reported']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    rows = table()
    sys.stdout.write((json.dumps(rows, indent=2) if args.json else markdown(rows)) + "\n")


if __name__ == "__main__":
    main()
