"""Adapters as pure transforms of a plain Flax params tree, and the merged path.

`attach(params, config)` (or `apply_vera(params)`, ...; the method comes from the registry, see
`methods/registry.py`) returns an `Adapted` pytree: the untouched base params, the trainable
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

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, struct

from ..quant import is_quantized
from ..tree import get_path, set_path
from . import projections as projections_lib
from . import targets as targets_lib
from .methods import registry
from .targets import LayerSpec

Params = Any


@struct.dataclass
class Adapted:
    """A params tree with an adapter attached (a pytree; jit, grad and tree_map see through it).

    base: the model's params, unchanged (plain nested dicts).
    adapter: {module path...: {leaf: array}}, the method's per-layer leaves: "lambda_d" (r,),
             "lambda_b" (out,) for VeRA (and "magnitude" (out,) for DVoRA), "lora_A" (r, in),
             "lora_B" (out, r) for LoRA; {} for head-only and full fine-tuning.
    projections: frozen arrays the method draws (VeRA: {"A": (r, in_max), "B": (out_max, r)};
             per layer or per shape, see `projections.py`), {} otherwise.
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


def attach(params: Params, config) -> Adapted:
    """Attaches the adapter `config` describes (its method is looked up in the registry) to
    `params`: the method's `init` on the targeted layers, the `trainable_extra` leaves found."""
    method = registry.for_config(config)
    params, source = _plain(params), _source(params)
    layers, adapter, projections = (), {}, {}
    if method.adapts_layers:
        layers = targets_lib.find_targets(params, config)
        adapter, projections = method.init(params, config, layers)
    extra = targets_lib.find_extra(params, config.trainable_extra)
    return Adapted(params, adapter, projections, config, layers, extra, source)


def attach_as(name: str, params: Params, config) -> Adapted:
    """`attach` for the `apply_<method>` entry points: TypeError unless `config` is that method's."""
    cls = registry.get(name).config_class
    if type(config) is not cls:
        raise TypeError(f"config: expected a {cls.__name__}, got {type(config).__name__}")
    return attach(params, config)


def layer_projections(adapted: Adapted, spec: LayerSpec) -> tuple[jax.Array, jax.Array]:
    """(A_l, B_l) of one layer for a method with VeRA's projections (shared, per layer or per shape)."""
    return projections_lib.layer_pair(adapted.projections, adapted.config, spec)


def _narrow(dtype) -> jnp.dtype:
    """The dtype the delta's products run in: a narrower float than float32 (bfloat16, float16)
    as given, anything else float32."""
    dtype = jnp.dtype(dtype if dtype is not None else jnp.float32)
    narrow = jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4
    return dtype if narrow else jnp.dtype(jnp.float32)


def dense_kernel(w) -> jax.Array:
    """A kernel as float32 (a quantized one dequantized), for methods that read W0 itself."""
    return (w.dequantize() if is_quantized(w) else w).astype(jnp.float32)


def merged_kernel(adapted: Adapted, spec: LayerSpec, w0: jax.Array, dtype=None) -> jax.Array:
    """The layer's adapted (in, out) float32 kernel from its flattened base kernel `w0`: W0 +
    delta, times the method's per-output `rescale` when it has one (DVoRA)."""
    method = registry.get(adapted.method)
    if method.delta is None:
        raise ValueError(f"method {adapted.method!r} has no weight delta (no merged path); use path='factored'")
    vec = get_path(adapted.adapter, spec.path)
    w = w0.astype(jnp.float32) + method.delta(adapted, spec, vec, _narrow(dtype))
    if method.rescale is not None:
        w = w * method.rescale(adapted, spec, vec, w)[None, :]
    return w


def layer_delta(adapted: Adapted, spec: LayerSpec, dtype=None) -> jax.Array:
    """The layer's weight delta as an (in, out) float32 matrix (W_eff - W0).

    dtype: the operands' dtype for the products (bfloat16 / float16 run there with float32
    accumulation; None or anything else: float32). The merged path passes the compute dtype, so
    a bfloat16 step never runs float32 matmuls for its deltas."""
    method = registry.get(adapted.method)
    if method.delta is None:
        raise ValueError(f"method {adapted.method!r} has no weight delta (no merged path); use path='factored'")
    if method.rescale is None:
        return method.delta(adapted, spec, get_path(adapted.adapter, spec.path), _narrow(dtype))
    w0 = dense_kernel(get_path(adapted.base, spec.path)["kernel"]).reshape(spec.in_features, spec.out_features)
    return merged_kernel(adapted, spec, w0, dtype) - w0


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
        flat = w0.reshape(spec.in_features, spec.out_features)
        module["kernel"] = merged_kernel(adapted, spec, flat, narrow).reshape(spec.kernel_shape).astype(w0.dtype)
        set_path(out, spec.path, module)
    return out
