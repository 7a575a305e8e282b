"""Merged Hugging Face checkpoints: base + adapter folded into the weights, written as a
`config.json` + `model.safetensors` directory that transformers (PyTorch) loads like any
checkpoint. This is VeRA's "no extra inference latency" deployment path: the served model has
the base model's shapes and cost, and needs neither vera_jax nor PEFT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from vera_jax.adapters import core
from vera_jax.adapters.core import Adapted
from vera_jax.interop.layout import read_hf_config
from vera_jax.models import hub

WEIGHTS_FILE = "model.safetensors"


def export_merged(path: str | os.PathLike, adapted, hf_config, *, dtype=None, tokenizer=None) -> Path:
    """Writes `merge(adapted)` (or plain `params`) in HF naming to the directory `path`.

    `hf_config`: the config.json (dict or path) of the architecture the params are, e.g.
    RobertaForSequenceClassification with its num_labels; written out with `dtype` set.
    `dtype`: cast floating tensors (e.g. "bfloat16"); default keeps the params' dtypes.
    `tokenizer`: a transformers tokenizer to save beside the weights (what from_pretrained returned).
    """
    hf_config = read_hf_config(hf_config)
    params = core.merge(core.unstack(adapted)) if isinstance(adapted, Adapted) else core._plain(adapted)
    tensors = hub.family(hf_config["model_type"]).params_to_hf(jax.tree.map(np.asarray, params), hf_config)
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        tensors = {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) or v.dtype.kind == "V" else v
                   for k, v in tensors.items()}
    floats = sorted({str(v.dtype) for v in tensors.values() if v.dtype.kind in "fV"})
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / WEIGHTS_FILE),
              metadata={"format": "pt"})
    config = {k: v for k, v in hf_config.items() if k != "torch_dtype"}
    if len(floats) == 1:
        config["dtype"] = floats[0]
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory
