"""Adapters (VeRA, LoRA, DVoRA, head-only, full, or a registered one) as pure transforms of a Flax
param tree (see vera_jax/__init__.py for the API)."""

from .._lazy import lazy_exports

# each name imported from its module when first used: `vera_jax.adapters.config` alone stays light;
# the built-in methods register themselves when the registry is first asked (methods/registry.py)
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".config": ("DVoraConfig", "FullConfig", "HeadConfig", "LoraConfig", "MethodConfig", "VeraConfig"),
    ".core": ("Adapted", "attach", "layer_delta", "merge", "unstack"),
    ".cost": ("choose_path", "layer_costs"),
    ".factored": ("apply_adapted", "apply_factored", "call_adapted"),
    ".files": ("AdapterFileError", "load_adapter", "save_adapter"),
    ".flax_nnx": ("nnx_merge",),
    ".methods.dvora": ("apply_dvora",),
    ".methods.full": ("apply_full",),
    ".methods.head": ("apply_head",),
    ".methods.lora": ("apply_lora",),
    ".methods.registry": ("Method", "PeftMapping", "get_method", "register", "unregister"),
    ".methods.vera": ("apply_vera",),
    ".projections": ("fingerprint", "make_projections"),
    ".split": ("combine", "count_trainable", "optax_labels", "partition"),
    ".targets": ("LayerSpec", "find_targets"),
})
