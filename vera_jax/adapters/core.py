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

Stacked layers (a kernel with leading layer axes, `targets.py`): the method's leaves carry the
same leading axes (VeRA's d (L, r), b (L, out)); the method's functions stay per layer: `init`
runs on the unrolled twin's layers (so every layer starts as its twin does), and `delta`, `term`,
`rescale` are vmapped over the layer axes (`per_layer`), so the merged path forms all L deltas
in one batched product. `unstack` gives the unrolled twin's Adapted.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ..quant import is_quantized
from ..tree import flatten, get_path, set_path
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
    source (static): "nnx" when attached to flax.nnx params (the factored path then hooks nnx
             layers, `nnx_hooks`), else "linen".
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


def attach(params: Params, config, axis_names=None) -> Adapted:
    """Attaches the adapter `config` describes (its method is looked up in the registry) to
    `params`: the method's `init` on the targeted layers, the `trainable_extra` leaves found.
    Boxed linen params (nn.Partitioned) say where layer axes are; `axis_names` ({leaf path: axis
    names}, `targets.axis_names`) gives that metadata for params that cannot carry it."""
    method = registry.for_config(config)
    if axis_names is None:
        axis_names = targets_lib.axis_names(params) if isinstance(params, Mapping) else {}
    params, source = _plain(params), _source(params)
    layers, adapter, projections = (), {}, {}
    if method.adapts_layers:
        layers = targets_lib.find_targets(params, config, axis_names)
        adapter, projections = _init(method, params, config, layers)
    extra = targets_lib.find_extra(params, config.trainable_extra)
    return Adapted(params, adapter, projections, config, layers, extra, source)


def _init(method, params: dict, config, layers: tuple[LayerSpec, ...]) -> tuple[dict, dict]:
    """The method's `init`; for stacked layers, on the unrolled twin's layers (each module's
    params sliced per layer), the results stacked back on the layer axes."""
    if not any(s.stack for s in layers):
        return method.init(params, config, layers)
    twin, twin_layers = {}, []
    for spec, one, index in targets_lib.unrolled(layers):
        module = get_path(params, spec.path)
        set_path(twin, one.path, module if not index else _take(module, index))
        twin_layers.append(one)
    adapter, projections = method.init(twin, config, tuple(twin_layers))
    return restack(adapter, layers), restack(projections, layers)


def _take(tree, index: tuple[int, ...]):
    """Every leaf of `tree` at `index` of its leading axes (a quantized kernel's arrays too)."""
    return jax.tree.map(lambda x: x[index], tree)


def _layer_paths(layers) -> dict:
    """Per-layer path -> (stacked spec, index) of every stacked layer."""
    return {one.path: (spec, index) for spec in layers if spec.stack for index, one in spec.layers()}


def restack(tree: dict, layers) -> dict:
    """A tree keyed by per-layer paths (`layers_0/query/...`) back on the stacked paths
    (`layers/query/...`, each leaf stacked on the layer axes); other entries kept. Layers a spec's
    `keep` leaves out get zeros (masked on every path)."""
    where, groups, out = _layer_paths(layers), {}, {}
    for path, leaf in flatten(tree).items():
        hit = next(((where[path[:n]], path[n:]) for n in range(1, len(path)) if path[:n] in where), None)
        if hit is None:
            set_path(out, path, leaf)
        else:
            (spec, index), rest = hit
            groups.setdefault((spec, rest), {})[index] = leaf
    for (spec, rest), parts in groups.items():
        zero = jnp.zeros_like(jnp.asarray(next(iter(parts.values()))))
        stacked = jnp.stack([jnp.asarray(parts[i]) if i in parts else zero for i in np.ndindex(*spec.layer_shape)])
        set_path(out, spec.path + rest, stacked.reshape(spec.layer_shape + stacked.shape[1:]))
    return out


def unstack_tree(tree: dict, layers) -> dict:
    """Inverse of `restack`: leaves under a stacked layer's path split per layer."""
    stacked = {spec.path: spec for spec in layers if spec.stack}
    out = {}
    for path, leaf in flatten(tree).items():
        spec = next((stacked[path[:n]] for n in range(1, len(path)) if path[:n] in stacked), None)
        if spec is None:
            set_path(out, path, leaf)
            continue
        for index, one in spec.layers():
            set_path(out, one.path + path[len(spec.path):], _take(leaf, index))
    return out


def _unstack_params(params: dict, layers) -> dict:
    """The unrolled twin's params: each scanned module's subtree split into `<name>_<i>` subtrees
    (outer scans first, so a scan of scans gives `groups_0/layers_1`)."""
    out = jax.tree.map(lambda x: x, params, is_leaf=is_quantized)
    for depth in range(max(len(s.stack) for s in layers)):
        for spec in layers:
            if len(spec.stack) <= depth:
                continue
            pos, n = spec.stack[depth]
            lead = sum(k for _, k in spec.stack[:depth])
            for outer in np.ndindex(*spec.layer_shape[:lead]):
                source = spec.layer_path(outer)[: pos + 1]
                parent = get_path(out, source[:-1]) if pos else out
                if source[-1] not in parent:
                    continue  # split already, by another layer of this module
                sub = parent.pop(source[-1])
                for inner in np.ndindex(*spec.layer_shape[lead: lead + n]):
                    name = "_".join([str(source[-1])] + [str(i) for i in inner])
                    parent[name] = _take(sub, inner)
    return out


def unstack(adapted: Adapted) -> Adapted:
    """The Adapted its unrolled twin would have: per-layer paths (`layers_0/...`), the base's
    scanned subtrees sliced per layer, the adapter's and projections' leaves split per layer.
    For whatever reads one layer at a time (PEFT export, `to_lora`, per-layer inspection)."""
    if not any(s.stack for s in adapted.layers):
        return adapted
    layers = tuple(one for _, one, _ in targets_lib.unrolled(adapted.layers))
    base = _unstack_params(adapted.base, adapted.layers)
    extra = targets_lib.find_extra(base, adapted.config.trainable_extra)
    return Adapted(base, unstack_tree(adapted.adapter, adapted.layers),
                   unstack_tree(adapted.projections, adapted.layers), adapted.config, layers, extra, adapted.source)


def per_layer_view(adapted: Adapted) -> Adapted:
    """`adapted` seen one layer at a time: stacked layers as their unrolled twin's (per-layer paths,
    adapter and projections split per layer), the base untouched (not sliced: cheap). For code
    that reads layers one by one (adapter files, to_lora / to_vera); `restack` puts such an
    adapter tree back. `unstack` also unrolls the base."""
    if not any(s.stack for s in adapted.layers):
        return adapted
    layers = tuple(one for _, one, _ in targets_lib.unrolled(adapted.layers))
    return adapted.replace(adapter=unstack_tree(adapted.adapter, adapted.layers),
                           projections=unstack_tree(adapted.projections, adapted.layers), layers=layers)


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


def own_projections(adapted: Adapted, spec: LayerSpec):
    """The layer's own entry of the projections (per-layer A/B, share_projections=False), or None."""
    try:
        own = get_path(adapted.projections, spec.path)
    except (KeyError, TypeError, IndexError):
        return None
    return own if isinstance(own, Mapping) else None


def sliced(adapted: Adapted, spec: LayerSpec, vec: dict, own=None) -> Adapted:
    """`adapted` with the layer's adapter leaves replaced by `vec` (and its own projections by
    `own`): one layer's slice of a stacked layer, for a method's per-layer functions."""
    adapter = jax.tree.map(lambda x: x, adapted.adapter)
    set_path(adapter, spec.path, vec)
    projections = adapted.projections
    if own is not None:
        projections = jax.tree.map(lambda x: x, projections)
        set_path(projections, spec.path, own)
    return adapted.replace(adapter=adapter, projections=projections)


def per_layer(adapted: Adapted, spec: LayerSpec, fn, *args):
    """`fn(adapted_l, spec_l, *args_l)` for each layer of `spec`, vmapped over its layer axes (one
    batched computation; `args` carry the layer axes too) and stacked back; a plain call for an
    unstacked layer. `adapted_l` holds that layer's slice of the adapter (and own projections)."""
    if not spec.stack:
        return fn(adapted, spec, *args)
    flat = lambda x: x.reshape((spec.n_layers,) + x.shape[spec.stacked_axes:])  # noqa: E731
    vec, own = get_path(adapted.adapter, spec.path), own_projections(adapted, spec)

    def one(vec_l, own_l, *args_l):
        return fn(sliced(adapted, spec, vec_l, own_l), spec.per_layer, *args_l)

    out = jax.vmap(one)(jax.tree.map(flat, vec), jax.tree.map(flat, own), *jax.tree.map(flat, args))
    return jax.tree.map(lambda y: y.reshape(spec.layer_shape + y.shape[1:]), out)


def masked(spec: LayerSpec, new: jax.Array, old) -> jax.Array:
    """`new` (*layer_shape, ...) where the stacked layer is adapted, `old` in the layers its `keep`
    leaves out (exactly, so they get no gradient); `new` when every layer is adapted."""
    mask = spec.mask
    if mask is None:
        return new
    return jnp.where(mask.reshape(mask.shape + (1,) * (jnp.ndim(new) - mask.ndim)), new, old)


def merged_kernel(adapted: Adapted, spec: LayerSpec, w0: jax.Array, dtype=None) -> jax.Array:
    """The layer's adapted (in, out) float32 kernel from its flattened base kernel `w0`: W0 +
    delta, times the method's per-output `rescale` when it has one (DVoRA). A stacked layer's
    `w0` is (*layer_shape, in, out), and so is the result (all layers in one batched product)."""
    method = registry.get(adapted.method)
    if method.delta is None:
        raise ValueError(f"method {adapted.method!r} has no weight delta (no merged path); use path='factored'")
    if spec.stack:
        merged = per_layer(adapted, spec, lambda a, s, w: merged_kernel(a, s, w, dtype), w0)
        return masked(spec, merged, w0.astype(jnp.float32))
    vec = get_path(adapted.adapter, spec.path)
    w = w0.astype(jnp.float32) + method.delta(adapted, spec, vec, _narrow(dtype))
    if method.rescale is not None:
        w = w * method.rescale(adapted, spec, vec, w)[None, :]
    return w


def flat_kernel(spec: LayerSpec, w: jax.Array) -> jax.Array:
    """A kernel as (*layer_shape, in, out)."""
    return w.reshape(spec.layer_shape + (spec.in_features, spec.out_features))


def layer_delta(adapted: Adapted, spec: LayerSpec, dtype=None) -> jax.Array:
    """The layer's weight delta as an (in, out) float32 matrix (W_eff - W0); (*layer_shape, in,
    out) for a stacked layer.

    dtype: the operands' dtype for the products (bfloat16 / float16 run there with float32
    accumulation; None or anything else: float32). The merged path passes the compute dtype, so
    a bfloat16 step never runs float32 matmuls for its deltas."""
    method = registry.get(adapted.method)
    if method.delta is None:
        raise ValueError(f"method {adapted.method!r} has no weight delta (no merged path); use path='factored'")
    if method.rescale is None:
        delta = per_layer(adapted, spec, lambda a, s: method.delta(a, s, get_path(a.adapter, s.path), _narrow(dtype)))
        return masked(spec, delta, 0.0)
    w0 = flat_kernel(spec, dense_kernel(get_path(adapted.base, spec.path)["kernel"]))
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
        merged = merged_kernel(adapted, spec, flat_kernel(spec, w0), narrow)
        module["kernel"] = merged.reshape(spec.kernel_shape).astype(w0.dtype)
        set_path(out, spec.path, module)
    return out
