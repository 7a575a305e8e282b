"""VeRA and LoRA as pure transforms of a plain Flax params tree, and the merged path.

`apply_vera(params)` returns an `Adapted` pytree: the untouched base params, the trainable
vectors (one dict per adapted module, mirroring the module paths), the frozen projections and,
as static data, the config and the adapted layers. `merge(adapted)` folds the adapter into the
kernels (W0 + delta) and returns plain params for the model's ordinary `apply`.

flax.nnx: `params` may also be an nnx Module (its `nnx.Param` state is taken) or an nnx State.
The base is then stored as the State's pure dict (`State.to_pure_dict()`: the arrays, without
the Variable wrappers, keys kept, so an `nnx.List` gives integer keys), and `merge` returns the
same kind of pure dict, which `nnx.merge(graphdef, merged, *other_states)` and
`nnx.update(model, merged)` accept as they are.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, struct

from ..quant import is_quantized
from ..tree import get_path, set_path
from . import targets as targets_lib
from .config import FullConfig, HeadConfig, LoraConfig, VeraConfig
from .projections import PRNG_IMPL, make_layer_projections, make_projections
from .targets import LayerSpec

Params = Any


@struct.dataclass
class Adapted:
    """A params tree with an adapter attached (a pytree; jit, grad and tree_map see through it).

    base: the model's params, unchanged (plain nested dicts).
    adapter: {module path...: {"lambda_d": (r,), "lambda_b": (out,)}} for VeRA,
             {...: {"lora_A": (r, in), "lora_B": (out, r)}} for LoRA, {} otherwise.
    projections: {"A": (r, in_max), "B": (out_max, r)} for VeRA ({module path...: {"A", "B"}}
             with share_projections=False), {} otherwise (frozen).
    config, layers, extra (static): the config, the adapted LayerSpecs, and the base leaf paths
             trained alongside (config.trainable_extra).
    source (static): "nnx" when attached to flax.nnx params (the factored path cannot see nnx
             calls), else "linen".
    """

    base: Params
    adapter: dict
    projections: dict
    config: Any = struct.field(pytree_node=False)
    layers: tuple[LayerSpec, ...] = struct.field(pytree_node=False)
    extra: tuple[tuple[Any, ...], ...] = struct.field(pytree_node=False)
    source: str = struct.field(pytree_node=False, default="linen")

    @property
    def method(self) -> str:
        return self.config.method


def _plain(params: Params) -> dict:
    """A plain nested dict of arrays: linen params unboxed and unfrozen; an nnx Module's Param
    state or an nnx State as its pure dict."""
    if isinstance(params, nnx.Module):
        return nnx.state(params, nnx.Param).to_pure_dict()
    if isinstance(params, nnx.State):
        return params.to_pure_dict()
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params: expected a Flax params dict, an nnx Module or an nnx State, got {type(params).__name__}")
    return flax.core.unfreeze(nn.meta.unbox(params))


def _source(params: Params) -> str:
    return "nnx" if isinstance(params, (nnx.Module, nnx.State)) else "linen"


def apply_vera(params: Params, config: VeraConfig | None = None) -> Adapted:
    """Attaches VeRA to `params`: d = d_initial, b = b_initial (0), so the adapted model starts
    equal to the base."""
    config = VeraConfig() if config is None else config
    if not isinstance(config, VeraConfig):
        raise TypeError(f"config: expected a VeraConfig, got {type(config).__name__}")
    params, source = _plain(params), _source(params)
    layers = targets_lib.find_targets(params, config)
    in_max = max(s.in_features for s in layers)
    out_max = max(s.out_features for s in layers)
    adapter: dict = {}
    for s in layers:
        set_path(adapter, s.path, {
            "lambda_d": jnp.full((config.r,), config.d_initial, jnp.float32),
            "lambda_b": jnp.full((s.out_features,), config.b_initial, jnp.float32),
        })
    if config.share_projections:
        projections = make_projections(config.seed, config.r, in_max, out_max, config.projection_init)
    else:
        projections = make_layer_projections(config.seed, config.r, layers, config.projection_init)
    extra = targets_lib.find_extra(params, config.trainable_extra)
    return Adapted(params, adapter, projections, config, layers, extra, source)


def apply_lora(params: Params, config: LoraConfig) -> Adapted:
    """Attaches LoRA: A Kaiming-uniform (bound 1/sqrt(in), PEFT's), B = 0."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config: expected a LoraConfig, got {type(config).__name__}")
    params, source = _plain(params), _source(params)
    layers = targets_lib.find_targets(params, config)
    key = jax.random.key(config.seed, impl=PRNG_IMPL)
    adapter: dict = {}
    for i, s in enumerate(layers):
        bound = 1.0 / s.in_features**0.5
        with jax.threefry_partitionable(True):
            a = jax.random.uniform(jax.random.fold_in(key, i), (config.r, s.in_features), jnp.float32, -bound, bound)
        set_path(adapter, s.path, {"lora_A": a, "lora_B": jnp.zeros((s.out_features, config.r), jnp.float32)})
    extra = targets_lib.find_extra(params, config.trainable_extra)
    return Adapted(params, adapter, {}, config, layers, extra, source)


def apply_head(params: Params, trainable_extra=("classifier",)) -> Adapted:
    """No adapter; only the `trainable_extra` modules train (the paper's "head only" baseline)."""
    config = HeadConfig(trainable_extra=trainable_extra)
    params, source = _plain(params), _source(params)
    return Adapted(params, {}, {}, config, (), targets_lib.find_extra(params, config.trainable_extra), source)


def apply_full(params: Params, trainable_extra=("classifier",)) -> Adapted:
    """Full fine-tuning: all base leaves train; `trainable_extra` ones get the "head" label."""
    config = FullConfig(trainable_extra=trainable_extra)
    params, source = _plain(params), _source(params)
    return Adapted(params, {}, {}, config, (), targets_lib.find_extra(params, config.trainable_extra), source)


def layer_projections(adapted: Adapted, spec: LayerSpec) -> tuple[jax.Array, jax.Array]:
    """VeRA's (A_l, B_l) for one layer: slices of the shared pair, or the layer's own pair."""
    if adapted.config.share_projections:
        return adapted.projections["A"][:, : spec.in_features], adapted.projections["B"][: spec.out_features, :]
    own = get_path(adapted.projections, spec.path)
    return own["A"], own["B"]


def _narrow(dtype) -> jnp.dtype:
    """The dtype the delta's products run in: a narrower float than float32 (bfloat16, float16)
    as given, anything else float32."""
    dtype = jnp.dtype(dtype if dtype is not None else jnp.float32)
    narrow = jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4
    return dtype if narrow else jnp.dtype(jnp.float32)


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


def layer_delta(adapted: Adapted, spec: LayerSpec, dtype=None) -> jax.Array:
    """The layer's weight delta as an (in, out) float32 matrix.

    dtype: the operands' dtype for the products (bfloat16 / float16 run there with float32
    accumulation; None or anything else: float32). The merged path passes the compute dtype, so
    a bfloat16 step never runs float32 matmuls for its deltas."""
    vec = get_path(adapted.adapter, spec.path)
    if adapted.method == "vera":
        a, b = layer_projections(adapted, spec)
        return vera_delta(a, b, vec["lambda_d"], vec["lambda_b"], _narrow(dtype))
    if adapted.method == "lora":
        return (vec["lora_A"].T @ vec["lora_B"].T) * adapted.config.scaling
    raise ValueError(f"method {adapted.method!r} has no weight delta")


def merge(adapted: Adapted, dtype=None) -> Params:
    """Plain params with every adapted kernel replaced by W0 + delta (added in float32, cast back
    to the kernel's dtype). Pure and jit-friendly: call it inside the jitted step. A quantized
    kernel (`vera_jax.quant`) is never merged into: ValueError naming the layer.

    dtype: the compute dtype the merged kernels will run in (default: each kernel's own); a
    bfloat16/float16 one runs the VeRA deltas' products on that dtype with float32 accumulation
    (`layer_delta`), float32 otherwise."""
    if not isinstance(adapted, Adapted):
        raise TypeError(f"merge: expected an Adapted tree, got {type(adapted).__name__}")
    out = jax.tree.map(lambda x: x, adapted.base)
    for spec in adapted.layers:
        module = dict(get_path(out, spec.path))
        w0 = module["kernel"]
        if is_quantized(w0):
            raise ValueError(
                f"merge: layer {spec.name} has a quantized kernel ({w0.method}); merging W0 + delta into it would "
                "round the adapter's update onto the quantized grid, and frozen means frozen. Use "
                "path='factored' or 'auto' (both factor quantized layers).")
        narrow = dtype if dtype is not None else w0.dtype
        delta = layer_delta(adapted, spec, narrow).reshape(spec.kernel_shape)
        module["kernel"] = (w0.astype(jnp.float32) + delta).astype(w0.dtype)
        set_path(out, spec.path, module)
    return out
