"""The factored path: run any linen model on its base params and add each adapted layer's low-rank
term to that layer's output, without building W0 + delta.

    y = x @ W0 + (((x @ A_l.T) * d) @ B_l.T) * b          (VeRA)
    y = x @ W0 + ((x @ A.T) @ B.T) * alpha / r            (LoRA)

The model is not rewritten: `flax.linen.intercept_methods` sees every module call, and the ones
whose scope path is an adapted layer's param path get the extra term. The input is the call's
first argument, flattened over the kernel's input axes (DenseGeneral contracts the trailing axes).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .core import Adapted, get_path, layer_projections
from .targets import LayerSpec


def layer_term(adapted: Adapted, spec: LayerSpec, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
    """The adapter's additive output for input `x` of shape (..., in), shape (..., out)."""
    dropout = adapted.config.dropout
    if dropout and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    vec = get_path(adapted.adapter, spec.path)
    if adapted.method == "vera":
        a, b = (m.astype(x.dtype) for m in layer_projections(adapted, spec))
        h = (x @ a.T) * vec["lambda_d"].astype(x.dtype)
        return (h @ b.T) * vec["lambda_b"].astype(x.dtype)
    if adapted.method == "lora":
        h = x @ vec["lora_A"].astype(x.dtype).T
        return (h @ vec["lora_B"].astype(x.dtype).T) * jnp.asarray(adapted.config.scaling, x.dtype)
    raise ValueError(f"method {adapted.method!r} has no factored path")


def apply_factored(
    model: nn.Module,
    adapted: Adapted,
    *args,
    variables: dict[str, Any] | None = None,
    dropout_rng: jax.Array | None = None,
    **apply_kwargs,
):
    """`model.apply({"params": adapted.base, **variables}, *args, **apply_kwargs)` with every
    adapted layer's output increased by its low-rank term.

    dropout_rng: enables the config's adapter dropout (training); None disables it (eval).
    variables: other collections (e.g. batch_stats).
    """
    specs = {spec.path: spec for spec in adapted.layers}
    seen: set[tuple[str, ...]] = set()

    def interceptor(next_fun, call_args, call_kwargs, context):
        out = next_fun(*call_args, **call_kwargs)
        module = context.module
        if context.method_name != "__call__" or module.scope is None:
            return out
        spec = specs.get(tuple(module.scope.path))
        if spec is None or not call_args:
            return out
        seen.add(spec.path)
        x = call_args[0]
        lead = x.shape[: x.ndim - spec.in_axes]
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, len(seen))
        term = layer_term(adapted, spec, x.reshape(lead + (spec.in_features,)), rng)
        return out + term.reshape(out.shape).astype(out.dtype)

    with nn.intercept_methods(interceptor):
        result = model.apply({"params": adapted.base, **(variables or {})}, *args, **apply_kwargs)
    missing = sorted("/".join(p) for p in set(specs) - seen)
    if missing:
        raise ValueError(
            f"apply_factored: adapted layers never called as a module by this model: {missing}. "
            "The factored path needs each adapted kernel to belong to a linen module called once "
            "per layer (e.g. nn.Dense); use merge() for other models."
        )
    return result
