"""Load Hugging Face checkpoints (config.json + safetensors) into the Flax models.

`from_pretrained` dispatches on `config.json`'s `model_type` to a family module (imported
lazily from `FAMILIES`), which exposes `build`, `params_from_hf`, `params_to_hf`,
`HF_MODULE_NAMES` and `dummy_inputs`. Only safetensors are read: pickled `.bin`
checkpoints can run arbitrary code when loaded and are refused.
A path ending in `.gguf` is read by `vera_jax.models.gguf` (config and tokenizer from its metadata).
"""

from __future__ import annotations

import importlib
import importlib.resources
import json
import os
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

FAMILIES = {
    "bert": "vera_jax.models.roberta",
    "roberta": "vera_jax.models.roberta",
    "vit": "vera_jax.models.vit",
    "gpt2": "vera_jax.models.gpt2",
    "llama": "vera_jax.models.llama",
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model")
_DOWNLOAD_PATTERNS = ["config.json", "*.safetensors", "*.json", "*.txt", "*.model"]


def family(model_type: str) -> ModuleType:
    """The family module for an HF `model_type`."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[model_type])


def bundled_configs() -> list[str]:
    """Names of the config.json files shipped in vera_jax/models/configs (the paper's models)."""
    files = importlib.resources.files("vera_jax.models") / "configs"
    return sorted(f.name[: -len(".json")] for f in files.iterdir() if f.name.endswith(".json"))


def bundled_config(name: str) -> dict:
    """A shipped config.json (e.g. "roberta-large"): enough to build the model, no weights."""
    if name not in bundled_configs():
        raise ValueError(f"no bundled config {name!r}; available: {bundled_configs()}")
    return json.loads((importlib.resources.files("vera_jax.models") / "configs" / f"{name}.json").read_text())


def resolve(name_or_dir: str) -> str:
    """A local directory as is; otherwise a Hub id, downloaded (config, safetensors, tokenizer)."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if name_or_dir.startswith((".", "/", "~")) or os.path.exists(name_or_dir):
        raise FileNotFoundError(f"{name_or_dir}: not a checkpoint directory")
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_dir, allow_patterns=_DOWNLOAD_PATTERNS)


def read_config(path: str) -> dict:
    """The HF config of a checkpoint directory (config.json) or of a `.gguf` file (its metadata)."""
    if str(path).endswith(".gguf"):
        from vera_jax.models import gguf

        return gguf.read_config(str(path))
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{path}: no config.json")
    with open(config_file) as f:
        return json.load(f)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(load_file(os.path.join(path, shard)))
        return tensors
    pickled = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickled:
        raise ValueError(
            f"{path}: only pickle checkpoints found ({', '.join(sorted(pickled))}); safetensors are required "
            "(pickle is never loaded). Convert with transformers: "
            "model.save_pretrained(dir, safe_serialization=True)."
        )
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            "(safetensors are required)")


def load_tokenizer(path: str):
    """`transformers.AutoTokenizer` for the directory, or None when it has no tokenizer files."""
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def task_config(hf_config: dict, num_labels: int | None = None, architecture: str | None = None) -> dict:
    """`hf_config` set up for the requested head.

    `num_labels` without `architecture` picks the family's classification architecture
    (e.g. RobertaForSequenceClassification for a RobertaForMaskedLM checkpoint) and drops
    the checkpoint's label names.
    """
    hf_config = dict(hf_config)
    if num_labels is not None:
        hf_config["num_labels"] = num_labels
        hf_config.pop("id2label", None)
        hf_config.pop("label2id", None)
        if architecture is None:
            model_type = hf_config["model_type"]
            heads = getattr(family(model_type), "CLASSIFICATION_ARCHITECTURE", {})
            if model_type not in heads:
                raise ValueError(f"num_labels given, but model_type {model_type!r} has no classification head")
            architecture = heads[model_type]
    if architecture is not None:
        hf_config["architectures"] = [architecture]
    return hf_config


def from_pretrained(
    name_or_dir: str,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    num_labels: int | None = None,
    architecture: str | None = None,
) -> tuple[Any, dict, Any]:
    """(model, params, tokenizer or None) for a local checkpoint directory, a Hub id, or a local
    `.gguf` file (LLaMA architecture; dequantized to float, see `vera_jax.models.gguf`).

    The architecture is `architecture`, else the family's classification architecture when
    `num_labels` is given, else `config.json`'s `architectures[0]`. A head the checkpoint
    lacks (base weights loaded for classification) is freshly initialised from seed 0 (see
    the family's `params_from_hf`); any other missing, unexpected or misshapen tensor raises
    `common.CheckpointError` naming it. Params are cast to `param_dtype`.
    """
    if str(name_or_dir).endswith(".gguf"):
        from vera_jax.models import gguf

        reader = gguf.open_gguf(str(name_or_dir))
        hf_config = gguf.read_config(reader)
        tensors = gguf.read_tensors(reader, hf_config)
        tokenizer = gguf.load_tokenizer(reader)
    else:
        path = resolve(name_or_dir)
        hf_config = read_config(path)
        if "model_type" not in hf_config:
            raise ValueError(f"{path}/config.json has no model_type")
        tensors = read_safetensors(path)
        tokenizer = load_tokenizer(path)
    hf_config = task_config(hf_config, num_labels, architecture)
    fam = family(hf_config["model_type"])
    chosen = hf_config["architectures"][0] if num_labels is not None or architecture is not None else None
    model = fam.build(hf_config, dtype=dtype, param_dtype=param_dtype, architecture=chosen)
    params = fam.params_from_hf(tensors, hf_config)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=param_dtype), params)
    return model, params, tokenizer
