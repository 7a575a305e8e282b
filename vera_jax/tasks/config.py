"""The run config's shared parts a config file builds on: `config.model` and one method's fields.
Plain ml_collections, no JAX (importing a config file never starts JAX; tests/test_packaging.py)."""

from __future__ import annotations

import ml_collections

from vera_jax.errors import ConfigError

SET_BY_RUNNER = ("seed", "trainable_extra")  # method config fields the runner fills in


def model_config() -> ml_collections.ConfigDict:
    """The `config.model` fields the runner reads."""
    m = ml_collections.ConfigDict()
    m.checkpoint = ""  # Hub id, local checkpoint dir (config.json, *.safetensors, tokenizer) or .gguf file
    m.tokenizer = ""  # a tokenizer directory, when the checkpoint has none
    m.head = ("classifier",)  # modules trained in every method, at lr.head (trainable_extra)
    m.random_init = False  # True: only the checkpoint's config.json; weights drawn from `seed`
    m.overrides = ml_collections.ConfigDict()  # HF config fields replaced before building (e.g. layers)
    m.quantize = ""  # "" | "nf4" | "int8": frozen linear kernels (all but lm_head and model.head) kept quantized;
    # "gguf": a .gguf checkpoint's Q4_0/Q4_1 linear weights kept in their stored 4-bit blocks
    m.dtype = "float32"  # float32 | bfloat16 | float16: the loaded params (compute_dtype casts per step)
    m.loss_chunk = 256  # causal LMs: positions whose logits exist at once in the loss (memory O(chunk x vocab));
    # 0: all logits at once
    m.scan_layers = False  # True: the blocks run under one nn.scan (params stacked (layers, ...)); flat compile time
    return m


def method_config(cls, **values) -> ml_collections.ConfigDict:
    """Every field of a method's config class (VeraConfig, LoraConfig, DVoraConfig, ...) but those
    the runner sets, with the class defaults updated by `values`, so any of them can be set from the
    command line or swept."""
    out = ml_collections.ConfigDict()
    for name in cls.field_names():
        if name in SET_BY_RUNNER:
            continue
        value = values.pop(name, getattr(cls(), name))
        out[name] = ml_collections.config_dict.placeholder(tuple) if value is None else value
    if values:
        raise ConfigError(f"{cls.method}: unknown fields {sorted(values)}; allowed: {sorted(out)}")
    return out
