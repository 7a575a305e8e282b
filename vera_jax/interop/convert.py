"""VeRA as LoRA, exactly, and the reverse only where it is exact.

A VeRA layer's update is exactly rank r. In our (in, out) kernel layout

    delta = A_l^T diag(d) B_l^T diag(b) = lora_A^T lora_B^T   with   lora_A = diag(d) A_l  (r, in),
                                                                      lora_B = diag(b) B_l  (out, r),

which is LoRA with scaling alpha / r = 1. `to_lora` builds those factors (one elementwise product
each, no SVD, nothing lost), so every VeRA adapter can be written as a PEFT LoRA directory
(`save_peft_adapter(..., as_lora=True)`) and served by any LoRA server.

The reverse is not exact in general: a VeRA update lies in the subspace the frozen random A_l, B_l
span (r + out numbers per layer, against LoRA's r * (in + out)). `to_vera` recovers d and b only
when every LoRA factor is of the form above for the given projections (a LoRA that `to_lora` made
from VeRA) and refuses any other with the reason.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vera_jax.adapters import core
from vera_jax.adapters.config import LoraConfig, VeraConfig
from vera_jax.adapters.core import Adapted
from vera_jax.adapters.methods import registry

# Largest residual of a LoRA factor against VeRA's form, relative to the factor's largest entry,
# that still counts as exact (to_lora's float32 products round at ~6e-8).
EXACT_RTOL = 1e-5
# Targeting fields the two configs share, carried across unchanged so the same layers are adapted.
_SHARED = ("targets", "dropout", "trainable_extra", "seed", "layers_to_transform", "layers_pattern",
           "kernel_in_axes", "stacked_axes", "layer_axis_names")


def to_lora(adapted: Adapted) -> Adapted:
    """The LoRA adapter whose merge equals `adapted`'s merge (float32 factors, alpha = r).

    Any method whose registry record gives `lora_factors` converts: VeRA with shared, per-layer or
    per-shape projections. A LoRA adapter is returned unchanged, so any VeRA or LoRA adapter can be
    exported as LoRA; other methods (DVoRA's rescaling, head, full) have no plain low-rank update and
    are refused."""
    if not isinstance(adapted, Adapted):
        raise TypeError(f"to_lora: expected an Adapted tree, got {type(adapted).__name__}")
    if isinstance(adapted.config, LoraConfig):
        return adapted
    factors = registry.get(adapted.method).lora_factors
    if factors is None:
        raise ValueError(f"to_lora: method {adapted.method!r} has no plain low-rank update to write as LoRA (methods "
                         f"that convert: {[n for n in registry.names() if registry.get(n).lora_factors]}); export a "
                         "merged checkpoint with export_merged instead")
    c = adapted.config
    adapter: dict = {}
    view = core.per_layer_view(adapted)  # stacked layers one by one, stacked back below
    for spec in view.layers:
        lora_a, lora_b = factors(view, spec, core.get_path(view.adapter, spec.path))
        core.set_path(adapter, spec.path, {"lora_A": lora_a, "lora_B": lora_b})
    config = LoraConfig(r=c.r, alpha=float(c.r), **{k: getattr(c, k) for k in _SHARED})
    return Adapted(adapted.base, core.restack(adapter, adapted.layers), {}, config, adapted.layers, adapted.extra,
                   adapted.source)


def _fit_rows(factor: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, float]:
    """(s, relative residual) of the best `factor ~ diag(s) basis` row by row."""
    scale = np.sum(factor * basis, axis=1) / np.maximum(np.sum(basis * basis, axis=1), np.finfo(np.float32).tiny)
    residual = np.max(np.abs(factor - scale[:, None] * basis), initial=0.0)
    return scale, float(residual / max(np.max(np.abs(factor), initial=0.0), np.finfo(np.float32).tiny))


def to_vera(adapted: Adapted, config: VeraConfig) -> Adapted:
    """The VeRA adapter equal to the LoRA adapter `adapted`, when one exists: for each layer
    lora_A must be diag(d) A_l and scaling * lora_B diag(b) B_l for the projections `config`
    draws (its r, seed, projection_init, share_projections; the adapted layers, head and dropout
    come from `adapted`). True of a LoRA made by `to_lora` (also after a PEFT round trip);
    any other LoRA is refused with ValueError, since a VeRA update is confined to the frozen
    random subspace and the conversion would not be exact."""
    if not isinstance(adapted, Adapted):
        raise TypeError(f"to_vera: expected an Adapted tree, got {type(adapted).__name__}")
    if not isinstance(config, VeraConfig):
        raise TypeError(f"to_vera: config: expected a VeraConfig, got {type(config).__name__}")
    if not isinstance(adapted.config, LoraConfig):
        raise ValueError(f"to_vera: expected a LoRA adapter, got method {adapted.method!r}")
    lora = adapted.config
    if config.r != lora.r:
        raise ValueError(f"to_vera: VeraConfig.r={config.r} but the LoRA adapter has rank {lora.r}; a VeRA "
                         "adapter with rank-r projections can only equal a rank-r LoRA made from it")
    fields = {k: getattr(lora, k) for k in _SHARED if k != "seed"}
    fresh = core.attach(adapted.base, config.replace(**fields))
    if fresh.layers != adapted.layers:
        raise ValueError(f"to_vera: the LoRA config's targets select {[s.name for s in fresh.layers]} on its base, "
                         f"but the adapter holds {[s.name for s in adapted.layers]}")
    adapter: dict = {}
    view, fresh_view = core.per_layer_view(adapted), core.per_layer_view(fresh)
    for spec in view.layers:
        a, b = (np.asarray(jax.device_get(m), np.float64) for m in core.layer_projections(fresh_view, spec))
        vec = core.get_path(view.adapter, spec.path)
        d, off_a = _fit_rows(np.asarray(jax.device_get(vec["lora_A"]), np.float64), a)
        bvec, off_b = _fit_rows(lora.scaling * np.asarray(jax.device_get(vec["lora_B"]), np.float64), b)
        if max(off_a, off_b) > EXACT_RTOL:
            raise ValueError(
                f"to_vera: layer {spec.name}: this LoRA update is not a VeRA update for these projections (rows of "
                f"lora_A must be multiples of A_l's rows, rows of lora_B of B_l's; off by {max(off_a, off_b):.2g} "
                "relative). LoRA -> VeRA is not exact: a VeRA update is confined to the subspace of the frozen "
                f"random projections ({config.r} + out numbers per layer against LoRA's r * (in + out)); only a "
                "LoRA made by to_lora from VeRA with the same seed, r and projections converts back. Keep it as "
                "LoRA, or merge it (export_merged)")
        core.set_path(adapter, spec.path, {"lambda_d": jnp.asarray(d, jnp.float32),
                                           "lambda_b": jnp.asarray(bvec, jnp.float32)})
    return fresh.replace(adapter=core.restack(adapter, fresh.layers))
