"""VeRA and LoRA as pure transforms of a Flax param tree (see vera_jax/__init__.py for the API)."""

from .._lazy import lazy_exports

# each name imported from its module when first used: `vera_jax.adapters.config` alone stays light
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".config": ("FullConfig", "HeadConfig", "LoraConfig", "VeraConfig"),
    ".core": ("Adapted", "apply_full", "apply_head", "apply_lora", "apply_vera", "layer_delta", "merge"),
    ".cost": ("choose_path", "layer_costs"),
    ".factored": ("apply_adapted", "apply_factored", "call_adapted"),
    ".files": ("AdapterFileError", "load_adapter", "save_adapter"),
    ".flax_nnx": ("nnx_merge",),
    ".projections": ("fingerprint", "make_projections"),
    ".split": ("combine", "count_trainable", "optax_labels", "partition"),
    ".targets": ("LayerSpec", "find_targets"),
})
