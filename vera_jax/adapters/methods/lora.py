"""LoRA (Hu et al. 2021), the baseline: per-layer trainable A (r, in), B (out, r), scaled by alpha / r.

    delta_l = A^T B^T * alpha / r                  y = x @ W0 + ((x @ A.T) @ B.T) * alpha / r
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ...tree import set_path
from .. import core
from ..config import LoraConfig
from ..projections import PRNG_IMPL
from . import registry

# LoRA initialisations that leave the base weights alone (PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA
# rewrite them, so their adapters only fit a modified base model).
PEFT_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def init(params, config, layers) -> tuple[dict, dict]:
    """A Kaiming-uniform (bound 1/sqrt(in), PEFT's) from `seed` folded with the layer's index, B = 0."""
    key = jax.random.key(config.seed, impl=PRNG_IMPL)
    adapter: dict = {}
    for i, s in enumerate(layers):
        bound = 1.0 / s.in_features**0.5
        with jax.threefry_partitionable(True):
            a = jax.random.uniform(jax.random.fold_in(key, i), (config.r, s.in_features), jnp.float32, -bound, bound)
        set_path(adapter, s.path, {"lora_A": a, "lora_B": jnp.zeros((s.out_features, config.r), jnp.float32)})
    return adapter, {}


def delta(adapted, spec, vec, dtype) -> jax.Array:
    return (vec["lora_A"].T @ vec["lora_B"].T) * adapted.config.scaling


def lora_factors(adapted, spec, vec) -> tuple[jax.Array, jax.Array]:
    """The factors with the scaling folded into B (a LoRA of scaling 1)."""
    return (jnp.asarray(vec["lora_A"], jnp.float32),
            jnp.asarray(vec["lora_B"], jnp.float32) * adapted.config.scaling)


def term(adapted, spec, vec, x) -> jax.Array:
    h = x @ vec["lora_A"].astype(x.dtype).T
    return (h @ vec["lora_B"].astype(x.dtype).T) * jnp.asarray(adapted.config.scaling, x.dtype)


def cost(tokens: int, n_in: int, n_out: int, r: int, train: bool) -> dict:
    """Training: factored is x@A.T@B.T forward, the same again for the input gradient, and the
    factors' gradients (3 tokens*r*(in+out)); merged as VeRA's."""
    if train:
        return {"merged": tokens * n_in * n_out + 3 * n_in * r * n_out, "factored": 3 * tokens * r * (n_in + n_out)}
    return {"merged": n_in * r * n_out, "factored": tokens * r * (n_in + n_out)}


_NOT_PLAIN = tuple((field, (False,), "not a plain LoRA adapter")
                   for field in ("use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config",
                                 "megatron_config"))
PEFT_REFUSALS = (
    ("use_dora", (False,), "DoRA's magnitude vector has no vera_jax counterpart"),
    ("lora_bias", (False,), "it trains a bias on lora_B"),
    ("rank_pattern", (), "vera_jax's LoraConfig has one r for every layer"),
    ("alpha_pattern", (), "vera_jax's LoraConfig has one alpha for every layer"),
    ("init_lora_weights", PEFT_INITS,
     "this initialisation rewrites the base weights, so the adapter only fits that modified model; convert it to a "
     "plain LoRA first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"),
) + _NOT_PLAIN


def _from_peft(pc: dict, r: int, extra: tuple) -> dict:
    alpha = pc.get("lora_alpha", 8)
    if pc.get("use_rslora", False):
        alpha = alpha * math.sqrt(r)  # PEFT's rsLoRA scaling alpha / sqrt(r) as our alpha' / r
    return dict(r=r, alpha=alpha, dropout=pc.get("lora_dropout", 0.0), trainable_extra=extra)


def _to_peft(c: LoraConfig) -> dict:
    alpha = int(c.alpha) if float(c.alpha).is_integer() else c.alpha
    return {"r": c.r, "lora_alpha": alpha, "lora_dropout": c.dropout, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}


def apply_lora(params, config: LoraConfig) -> core.Adapted:
    """Attaches LoRA: A Kaiming-uniform (bound 1/sqrt(in), PEFT's), B = 0."""
    return core.attach_as(LoraConfig.method, params, config)


PEFT = registry.PeftMapping(
    peft_type="LORA",
    tensors={"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
    shapes=lambda r, spec: {"lora_A": (r, spec.in_features), "lora_B": (spec.out_features, r)},
    default_r=8,
    to_peft=_to_peft,
    from_peft=_from_peft,
    refusals=PEFT_REFUSALS,
)

METHOD = registry.register(registry.Method(
    name=LoraConfig.method, config_class=LoraConfig, init=init, delta=delta, term=term, cost=cost,
    lora_factors=lora_factors, peft=PEFT,
))
