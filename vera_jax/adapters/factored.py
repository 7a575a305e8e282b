"""The factored and auto paths: run any linen or flax.nnx model on its base params and handle
each adapted layer where it is called.

Factored: add the method's low-rank term (its registry `term`) to the layer's output, without
building W0 + delta:

    y = x @ W0 + ((x @ A_l.T) * d) @ (b * B_l).T          (VeRA; b scales B_l's rows)
    y = x @ W0 + ((x @ A.T) @ B.T) * alpha / r            (LoRA)
    y = s * (x @ W0 + term) + bias                        (a method with `rescale`, e.g. DVoRA)

Auto: per layer, merged or factored by the cost model (`cost.py`) for the token count the layer
sees; a merged layer runs an unbound copy of its own module on W0 + delta.

Quantized kernels (`vera_jax.quant`): every path runs them dequantized per call; an adapted one is
always factored (never merged into, `merge` refuses), its term computed and added in float32 so
small updates are not rounded away.

The model is not rewritten: `hooks.layer_hooks` (linen) or `nnx_hooks.layer_hooks` (flax.nnx:
nnx.Linear, LinearGeneral, Einsum) hands each adapted layer's call (its input flattened over the
kernel's input axes) to this path, so both share every per-layer rule here.

Stacked layers (linen `nn.scan`, nnx `nnx.scan`/`nnx.vmap` over layers): the scan body calls the
layer once per iteration with that iteration's slice of its params. The layer's stacked adapter
leaves (and own projections, and a per-layer id for the dropout key) ride along with its kernel
(`INJECTED` names: linen, extra entries of its params dict, which the module never reads; nnx, a
`nnx_hooks.Carried` kernel holding them), so the scan slices them with the kernel and the hook
finds the current layer's d and b beside it; the term is then computed exactly as for the
unrolled twin's layer.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import quant
from ..tree import get_path, path_str, set_path
from . import nnx_hooks
from .core import Adapted, dense_kernel, merge, merged_kernel, own_projections, sliced
from .cost import choose_path
from .hooks import LayerCall, layer_hooks
from .methods import registry
from .targets import LayerSpec

# params entries a stacked layer carries in: adapter leaves, own projections, layer id, adapted-or-not
INJECTED = ("__adapter__.", "__projection__.", "__layer_id__", "__keep__")


def layer_id(path) -> int:
    """A layer's id for its dropout key: crc32 of its (unrolled) path, the same in both layouts."""
    return zlib.crc32(path_str(path).encode())


def _carried(adapted: Adapted, spec: LayerSpec) -> dict:
    """The `INJECTED` entries a stacked layer carries: its adapter leaves, own projections and
    layer ids, each with the layer axes leading, and which layers are adapted when not all are."""
    carried = {INJECTED[0] + k: v for k, v in get_path(adapted.adapter, spec.path).items()}
    carried.update({INJECTED[1] + k: v for k, v in (own_projections(adapted, spec) or {}).items()})
    ids = [layer_id(spec.layer_path(index)) for index in np.ndindex(*spec.layer_shape)]
    carried[INJECTED[2]] = jnp.asarray(np.array(ids, np.uint32).reshape(spec.layer_shape))
    if spec.mask is not None:
        carried[INJECTED[3]] = jnp.asarray(spec.mask)
    return carried


def _inject(params, adapted: Adapted, specs) -> dict:
    """`params` with each stacked layer's `_carried` entries added to its module's dict (so
    nn.scan slices them per iteration)."""
    params = jax.tree.map(lambda x: x, params, is_leaf=quant.is_quantized)
    for spec in specs:
        set_path(params, spec.path, {**get_path(params, spec.path), **_carried(adapted, spec)})
    return params


def _current_layer(adapted: Adapted, spec: LayerSpec, own: dict):
    """(adapted holding this iteration's slice, the per-layer spec, the layer id, whether it is
    adapted: None when every layer is, else a bool scalar) of a stacked layer called inside its
    scan; `own` is the layer's params as called."""
    kernel_shape = tuple(np.shape(own["kernel"]))
    if kernel_shape != spec.per_layer.kernel_shape or INJECTED[2] not in own:
        raise ValueError(f"stacked layer {spec.name}: called with a kernel of shape {kernel_shape}, not one layer's "
                         f"{spec.per_layer.kernel_shape}; the factored and auto paths need it called inside the "
                         "nn.scan that stacks it (or use path='merged')")
    pick = lambda prefix: {k[len(prefix):]: v for k, v in own.items() if k.startswith(prefix)}  # noqa: E731
    return (sliced(adapted, spec, pick(INJECTED[0]), pick(INJECTED[1]) or None), spec.per_layer, own[INJECTED[2]],
            own.get(INJECTED[3]))


def layer_term(adapted: Adapted, spec: LayerSpec, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
    """The adapter's additive output for input `x` of shape (..., in), shape (..., out), for one
    (unstacked or per-layer) spec."""
    dropout = getattr(adapted.config, "dropout", 0.0)
    if dropout and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    method = registry.get(adapted.method)
    if method.term is None:
        raise ValueError(f"method {adapted.method!r} has no factored path (no term); use path='merged'")
    return method.term(adapted, spec, get_path(adapted.adapter, spec.path), x)


def _rescaled(adapted: Adapted, spec: LayerSpec, own: dict, out: jax.Array, term: jax.Array) -> jax.Array:
    """y = s * (x @ W0 + term) + bias for a method with a per-output `rescale` (DVoRA), s from
    the merged W0 + delta, all in float32; `out` is the layer's own output (x @ W0 + bias) and
    `own` its params."""
    method = registry.get(adapted.method)
    w0 = dense_kernel(own["kernel"]).reshape(spec.in_features, spec.out_features)
    vec = get_path(adapted.adapter, spec.path)
    scale = method.rescale(adapted, spec, vec, w0 + method.delta(adapted, spec, vec, jnp.float32))
    bias = own["bias"].astype(jnp.float32).reshape(spec.out_features) if "bias" in own else 0.0
    return scale * (out.astype(jnp.float32) - bias + term.astype(jnp.float32)) + bias


def layer_path(adapted: Adapted, spec: LayerSpec, tokens: int, path: str, train: bool = True,
               quantized: frozenset = frozenset(), dropout: bool = False) -> str:
    """The path one adapted layer takes under `call_adapted(path=...)` with `tokens` input rows:
    factored when asked, with adapter dropout, or for a quantized kernel (`quantized`: its layer
    paths, never merged into); merged when asked; auto: the cost model's choice."""
    if path == "factored" or dropout or spec.path in quantized:
        return "factored"
    if path == "merged":
        return "merged"
    if registry.get(adapted.method).cost is None:
        return "factored"
    return choose_path(tokens, spec.in_features, spec.out_features, adapted.config.r, adapted.method, train,
                       layers=spec.n_layers)


def call_adapted(
    fn: Callable,
    adapted: Adapted,
    *args,
    path: str = "auto",
    train: bool = True,
    dropout_rng: jax.Array | None = None,
    params_transform: Callable | None = None,
    compute_dtype=None,
):
    """`fn(params, *args)` on the adapted model, each adapted layer computed by the chosen path.

    fn: any function that runs linen modules on a params tree (a loss, `model.apply`, ...), or,
      for an adapter on nnx params, builds the nnx model from the params it gets
      (`nnx.merge(graphdef, params, rest)`) and runs it.
    path: "merged" (fn gets W0 + delta), "factored" (fn gets the base params; each adapted
      layer's output gains its low-rank term), or "auto": per layer, the cheaper of the two by
      `cost.choose_path` for the token count that layer actually sees (decided while tracing,
      free at run time; a merged layer runs an unbound copy of its own module on W0 + delta).
    train: whether the cost model counts the backward pass (False for eval and generation).
    dropout_rng: enables the config's adapter dropout (training), which forces the factored
      path (the merged path cannot drop the adapter's input alone); None disables it.
    params_transform: applied to the params handed to fn (e.g. a cast to the compute dtype).
    compute_dtype: the dtype merged kernels are computed in (default: their own); with bfloat16
      the merged deltas' products run in bfloat16 with float32 accumulation (`merge`).
    Results are equal across paths up to float rounding.
    """
    if path not in ("auto", "merged", "factored"):
        raise ValueError(f"path: {path!r} is not one of ['auto', 'merged', 'factored']")
    transform = params_transform or (lambda p: p)
    dropout = bool(getattr(adapted.config, "dropout", 0.0)) and dropout_rng is not None
    nnx_source = adapted.source == "nnx"
    dequantized = (nnx_hooks if nnx_source else quant).maybe_dequantized(adapted.base)
    if not adapted.layers or (path == "merged" and not dropout):
        with dequantized:
            return fn(transform(merge(adapted, compute_dtype)), *args)
    quantized = quant.quantized_paths(adapted.base)
    rescaled = registry.get(adapted.method).rescale is not None
    seen: set[tuple] = set()

    stacked = [s for s in adapted.layers if s.stack]

    def hook(call: LayerCall):
        seen.add(call.spec.path)
        quantized_layer = call.spec.path in quantized
        keep = None  # a stacked layer that `layers_to_transform` may leave out: its output is the base's
        if call.spec.stack:
            layer, spec, lid, keep = _current_layer(adapted, call.spec, call.params)
        else:
            layer, spec, lid = adapted, call.spec, layer_id(call.spec.path)
        unless_kept = (lambda new, old: new) if keep is None else (lambda new, old: jnp.where(keep, new, old))
        if layer_path(adapted, call.spec, call.tokens, path, train, quantized, dropout) == "merged":
            w0 = call.params["kernel"]
            narrow = compute_dtype if compute_dtype is not None else w0.dtype
            flat = w0.reshape(spec.in_features, spec.out_features)
            merged = unless_kept(merged_kernel(layer, spec, flat, narrow), flat.astype(jnp.float32))
            return call.run_with(kernel=merged.reshape(w0.shape).astype(w0.dtype))
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, lid)
        x = call.x.astype(jnp.float32) if rescaled or quantized_layer else call.x  # the term in float32
        term = layer_term(layer, spec, x, rng)
        if rescaled:
            out = call.run()
            flat = out.reshape(out.shape[: out.ndim - len(spec.kernel_shape) + spec.in_axes] + (spec.out_features,))
            y = unless_kept(_rescaled(layer, spec, call.params, flat, term), flat.astype(jnp.float32))
            return y.reshape(out.shape).astype(out.dtype)
        return call.add(unless_kept(term, jnp.zeros((), term.dtype)))

    params = transform(adapted.base)
    if nnx_source:
        params = nnx_hooks.carry(params, {spec.path: _carried(adapted, spec) for spec in stacked})
        hooks = nnx_hooks.layer_hooks(adapted.layers, params, hook)
    else:
        params, hooks = _inject(params, adapted, stacked), layer_hooks(adapted.layers, hook)
    # the interceptor entered first runs outermost: this one, then the dequantizing one
    with hooks, dequantized:
        result = fn(params, *args)
    missing = sorted(path_str(p) for p in {s.path for s in adapted.layers} - seen)
    if missing:
        needs = ("an nnx.Linear, LinearGeneral or Einsum built by fn from the params it is given "
                 "(nnx.merge(graphdef, params, rest))" if nnx_source else
                 "a linen module called once per layer (e.g. nn.Dense)")
        raise ValueError(
            f"path={path!r}: adapted layers never called as a module: {missing}. The factored and "
            f"auto paths need each adapted kernel to belong to {needs}; use path='merged' for other models."
        )
    return result


def apply_adapted(
    model: nn.Module,
    adapted: Adapted,
    *args,
    path: str = "auto",
    train: bool = True,
    variables: dict[str, Any] | None = None,
    dropout_rng: jax.Array | None = None,
    **apply_kwargs,
):
    """`model.apply({"params": ..., **variables}, *args, **apply_kwargs)` on the adapted model;
    `path`, `train` and `dropout_rng` as in `call_adapted`; `variables` holds other collections."""

    def run(params, *call_args):
        return model.apply({"params": params, **(variables or {})}, *call_args, **apply_kwargs)

    return call_adapted(run, adapted, *args, path=path, train=train, dropout_rng=dropout_rng)


def apply_factored(model: nn.Module, adapted: Adapted, *args, variables=None, dropout_rng=None, **apply_kwargs):
    """`apply_adapted(..., path="factored")`: every adapted layer adds its low-rank term to
    `x @ W0`, without building W0 + delta."""
    return apply_adapted(model, adapted, *args, path="factored", variables=variables, dropout_rng=dropout_rng,
                         **apply_kwargs)
