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
    adapted = vera_jax.attach(params, vera_jax.DVoraConfig(r=256))        # any registered method
    vera_jax.register_method(vera_jax.Method(name=..., config_class=..., init=..., delta=..., term=...))
"""

from ._lazy import lazy_exports

__version__ = "0.1.0"

# The public API, each name imported from its module when first used (importing a light module of
# vera_jax, e.g. a config's `vera_jax.train.config`, then never starts JAX).
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".adapters": (
        "Adapted", "AdapterFileError", "DVoraConfig", "FullConfig", "HeadConfig", "LayerSpec", "LoraConfig",
        "Method", "MethodConfig", "PeftMapping", "VeraConfig",
        "apply_adapted", "apply_dvora", "apply_factored", "apply_full", "apply_head", "apply_lora", "apply_vera",
        "attach", "call_adapted", "choose_path", "combine", "count_trainable", "find_targets", "fingerprint",
        "get_method", "layer_costs", "layer_delta", "load_adapter", "make_projections", "merge", "nnx_merge",
        "optax_labels", "partition", "save_adapter", "unstack",
    ),
    ".adapters.methods.registry": ("register_method", "unregister_method"),
    ".interop": ("PeftFormatError", "export_merged", "load_peft_adapter", "save_peft_adapter", "to_lora",
                  "to_vera"),
})
