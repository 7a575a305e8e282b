"""DVoRA (DoRA paper, Liu et al. 2024): VeRA's update as the direction, DoRA's trained magnitude.

    W' = m * (W0 + delta_VeRA) / ||W0 + delta_VeRA||_c

with the norm per output column over the input axis (Flax's (in, out) layout), detached from the
gradient as DoRA does (PEFT's `DoraLinearLayer` detaches the weight norm: the gradient reaches m
through the scale and d, b through the direction only). m (out,) starts at the norm of the
initial W0 + delta (||W0||_c with b_initial=0), so training starts at the base model.

Factored: y = (m / ||W0 + delta||_c) * (x @ W0 + vera_term(x)) + bias, the norm computed from
the merged weight (an in x r x out product per call, as DoRA pays). PEFT has no DVoRA (its DoRA
is LoRA-only): adapters are saved in vera_jax's own format, and the serving bank refuses them
(the per-row scale of the base output is not batched).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...tree import get_path, set_path
from .. import core
from .. import projections as projections_lib
from ..config import DVoraConfig
from . import registry, vera


def _column_norm(w: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=0))


def init(params, config, layers) -> tuple[dict, dict]:
    """VeRA's d and b, plus m = ||W0 + delta||_c at those initial values."""
    adapter, projections = vera.init(params, config, layers)
    for s in layers:
        vec = get_path(adapter, s.path)
        a, b = projections_lib.layer_pair(projections, config, s)
        w0 = core.dense_kernel(get_path(params, s.path)["kernel"]).reshape(s.in_features, s.out_features)
        w = w0 + vera.vera_delta(a, b, vec["lambda_d"], vec["lambda_b"])
        set_path(adapter, s.path, {**vec, "magnitude": _column_norm(w)})
    return adapter, projections


def rescale(adapted, spec, vec, w) -> jax.Array:
    """m / ||w||_c, the norm detached (a zero column keeps scale m, its weights being zero)."""
    norm = jax.lax.stop_gradient(_column_norm(w))
    return vec["magnitude"] / jnp.where(norm > 0, norm, 1.0)


def cost(tokens: int, n_in: int, n_out: int, r: int, train: bool) -> dict:
    """VeRA's, plus the column norms (in*out) on both paths and, factored, the delta they need."""
    base = vera.cost(tokens, n_in, n_out, r, train)
    return {"merged": base["merged"] + n_in * n_out,
            "factored": base["factored"] + n_in * r * n_out + n_in * n_out + tokens * n_out}


def apply_dvora(params, config: DVoraConfig | None = None) -> core.Adapted:
    """Attaches DVoRA: VeRA's d, b and a magnitude m = ||W0||_c per output; starts equal to the base."""
    return core.attach_as(DVoraConfig.method, params, DVoraConfig() if config is None else config)


METHOD = registry.register(registry.Method(
    name=DVoraConfig.method, config_class=DVoraConfig, init=init, delta=vera.delta, term=vera.term,
    rescale=rescale, cost=cost, label=vera.label,
))
