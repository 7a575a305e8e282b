"""VeRA (Kopiczko et al. 2024): frozen random A, B shared by every layer, trainable d (r,) and b (out,).

    delta_l = A_l^T diag(d) B_l^T diag(b)          y = x @ W0 + ((x @ A_l.T) * d) @ (b * B_l).T

A_l, B_l are slices of one pair (or per-layer / per-shape pairs, `projections.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ...tree import set_path
from .. import core
from .. import projections as projections_lib
from ..config import VeraConfig
from . import registry


def init(params, config, layers) -> tuple[dict, dict]:
    """d = d_initial, b = b_initial (0), so the adapted model starts equal to the base."""
    adapter: dict = {}
    for s in layers:
        set_path(adapter, s.path, {
            "lambda_d": jnp.full((config.r,), config.d_initial, jnp.float32),
            "lambda_b": jnp.full((s.out_features,), config.b_initial, jnp.float32),
        })
    return adapter, projections_lib.build(config, layers)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def vera_delta(a: jax.Array, b: jax.Array, d: jax.Array, bvec: jax.Array, dtype=jnp.float32) -> jax.Array:
    """VeRA's (in, out) weight delta `(a.T * d) @ (b.T * bvec)` (A^T diag(d) B'^T with B' = diag(b) B), float32.

    The products run on `dtype` operands with float32 accumulation, forward and backward. A
    hand-written VJP because autodiff would run the backward products on the float32 cotangent
    against the narrow operand (promoted: a float32 matmul, ~15x slower on a GPU's tensor cores),
    and because d and b need only the diagonals of those products: the backward is exactly two
    in x r x out products, `g @ (b.T * bvec).T` and `(a.T * d).T @ g`, each reduced against the
    frozen matrix elementwise; A and B get zero cotangents (they are frozen)."""
    ad, bb = (a.T * d).astype(dtype), (b.T * bvec[None, :]).astype(dtype)
    return jnp.matmul(ad, bb, preferred_element_type=jnp.float32)


def _vera_delta_fwd(a, b, d, bvec, dtype):
    return vera_delta(a, b, d, bvec, dtype), (a, b, d, bvec)


def _vera_delta_bwd(dtype, res, g):
    a, b, d, bvec = res
    g = g.astype(dtype)
    ad, bb = (a.T * d).astype(dtype), (b.T * bvec[None, :]).astype(dtype)
    g_ad = jnp.matmul(g, bb.T, preferred_element_type=jnp.float32)  # (in, r)
    g_bb = jnp.matmul(ad.T, g, preferred_element_type=jnp.float32)  # (r, out)
    grad_d = jnp.sum(g_ad * a.T.astype(jnp.float32), axis=0).astype(d.dtype)
    grad_bvec = jnp.sum(g_bb * b.T.astype(jnp.float32), axis=0).astype(bvec.dtype)
    return jnp.zeros_like(a), jnp.zeros_like(b), grad_d, grad_bvec


vera_delta.defvjp(_vera_delta_fwd, _vera_delta_bwd)


def delta(adapted, spec, vec, dtype) -> jax.Array:
    a, b = core.layer_projections(adapted, spec)
    return vera_delta(a, b, vec["lambda_d"], vec["lambda_b"], dtype)


def term(adapted, spec, vec, x) -> jax.Array:
    # b scales B's rows before the product, not the (tokens, out) product after it: autodiff
    # of `(h @ B.T) * b` keeps that (tokens, out) product for b's gradient (out up to the MLP
    # width per layer: more activation memory than LoRA's whole adapter); this way the
    # backward keeps only (tokens, r) and pays one more tokens x r x out product
    # (`cost.layer_costs`).
    a, b = core.layer_projections(adapted, spec)
    h = (x @ a.astype(x.dtype).T) * vec["lambda_d"].astype(x.dtype)
    return h @ (b * vec["lambda_b"][:, None]).astype(x.dtype).T


def lora_factors(adapted, spec, vec) -> tuple[jax.Array, jax.Array]:
    """delta = A_l^T diag(d) B_l^T diag(b) = (diag(d) A_l)^T (diag(b) B_l)^T: exactly a LoRA of rank r."""
    a, b = (jnp.asarray(m, jnp.float32) for m in core.layer_projections(adapted, spec))
    d, bvec = (jnp.asarray(vec[k], jnp.float32)[:, None] for k in ("lambda_d", "lambda_b"))
    return a * d, b * bvec


def cost(tokens: int, n_in: int, n_out: int, r: int, train: bool) -> dict:
    """Training: merged forms the delta and takes dW back to d and b (3 in*r*out) on top of the
    weight gradient; factored is forward x@A.T and h@(b*B).T, backward g@(b*B), g.T@h for b's
    gradient and @A for the input's (d's gradient is an elementwise sum)."""
    if train:
        return {"merged": tokens * n_in * n_out + 3 * n_in * r * n_out, "factored": tokens * r * (2 * n_in + 3 * n_out)}
    return {"merged": n_in * r * n_out, "factored": tokens * r * (n_in + n_out)}


def label(config, leaf: str):
    """d or b frozen by train_d / train_b=False are rebuilt from their initial value, not trained."""
    frozen = (leaf == "lambda_d" and not config.train_d) or (leaf == "lambda_b" and not config.train_b)
    return None if frozen else "adapter"


def peft_refuse(config):
    if not config.share_projections:
        why = (f"{type(config).__name__}.share_projections=False gives each layer its own A/B; "
               "PEFT's VeRA shares one pair")
    elif config.projections != "shared":
        why = (f"{type(config).__name__}.projections={config.projections!r} gives each kernel shape its own A/B; "
               "PEFT's VeRA slices one shared pair")
    else:
        return None
    return why + "; as_lora=True writes it as the LoRA it exactly is"


def bank_refuse(adapted):
    config = adapted.config
    stacked = [s.name for s in adapted.layers if s.stack]
    if stacked:
        return (f"layers {stacked} are stacked (nn.scan); the bank batches unrolled layers: load the adapter file "
                "onto the unrolled model (files name stacked layers per layer)")
    if not config.share_projections:
        return ("share_projections=False gives each layer its own A/B; the bank batches adapters on projections "
                "the group shares (one pair, or one per kernel shape)")
    return None


def apply_vera(params, config: VeraConfig | None = None) -> core.Adapted:
    """Attaches VeRA to `params`: d = d_initial, b = b_initial (0), so the adapted model starts
    equal to the base."""
    return core.attach_as(VeraConfig.method, params, VeraConfig() if config is None else config)


PEFT = registry.PeftMapping(
    peft_type="VERA",
    tensors={"lambda_d": "vera_lambda_d", "lambda_b": "vera_lambda_b"},
    shapes=lambda r, spec: {"lambda_d": (r,), "lambda_b": (spec.out_features,)},
    default_r=256,
    to_peft=lambda c: {"r": c.r, "projection_prng_key": c.seed, "save_projection": True, "vera_dropout": c.dropout,
                       "d_initial": c.d_initial, "init_weights": True},
    from_peft=lambda pc, r, extra: dict(r=r, d_initial=pc.get("d_initial", 0.1), seed=pc.get("projection_prng_key", 0),
                                        dropout=pc.get("vera_dropout", 0.0), trainable_extra=extra,
                                        save_projection=True),
    shared_projections=True,
    refuse=peft_refuse,
)

METHOD = registry.register(registry.Method(
    name=VeraConfig.method, config_class=VeraConfig, init=init, delta=delta, term=term, cost=cost, label=label,
    lora_factors=lora_factors, peft=PEFT, bank=lambda adapted, spec, vec: (vec["lambda_d"], vec["lambda_b"]),
    bank_refuse=bank_refuse,
))
