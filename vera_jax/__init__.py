"""vera_jax: VeRA (Vector-based Random Matrix Adaptation) for any Flax model.

    import vera_jax
    adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=256, targets=("query", "value")))
    logits = model.apply({"params": vera_jax.merge(adapted)}, x)          # merged path
    logits = vera_jax.apply_factored(model, adapted, x)                   # factored path
    logits = vera_jax.apply_adapted(model, adapted, x, path="auto")       # cheaper path per layer
    trainable, frozen = vera_jax.partition(adapted)                       # grad only trainable
    tx = optax.multi_transform({"adapter": ..., "head": ...}, vera_jax.optax_labels(adapted))
    vera_jax.save_adapter("out/adapter", adapted)
    adapted = vera_jax.load_adapter("out/adapter", params)
    vera_jax.save_peft_adapter("out/peft", adapted, hf_config, as_lora=True)   # the exact LoRA, for LoRA servers
    adapted = vera_jax.apply_vera(nnx_model, config); y = vera_jax.nnx_merge(nnx_model, adapted)(x)  # flax.nnx
"""

from .adapters import (
    Adapted,
    AdapterFileError,
    FullConfig,
    HeadConfig,
    LayerSpec,
    LoraConfig,
    VeraConfig,
    apply_adapted,
    apply_factored,
    apply_full,
    apply_head,
    apply_lora,
    apply_vera,
    call_adapted,
    choose_path,
    combine,
    count_trainable,
    find_targets,
    fingerprint,
    layer_costs,
    layer_delta,
    load_adapter,
    make_projections,
    merge,
    nnx_merge,
    optax_labels,
    partition,
    save_adapter,
)
from .interop import PeftFormatError, export_merged, load_peft_adapter, save_peft_adapter, to_lora, to_vera

__version__ = "0.1.0"

__all__ = [
    "Adapted", "AdapterFileError", "FullConfig", "HeadConfig", "LayerSpec", "LoraConfig", "VeraConfig",
    "apply_adapted", "apply_factored", "apply_full", "apply_head", "apply_lora", "apply_vera", "call_adapted",
    "choose_path", "combine",
    "count_trainable", "find_targets", "fingerprint", "layer_costs", "layer_delta", "load_adapter",
    "make_projections", "merge", "nnx_merge", "optax_labels", "partition", "save_adapter",
    "PeftFormatError", "export_merged", "load_peft_adapter", "save_peft_adapter", "to_lora", "to_vera",
]
