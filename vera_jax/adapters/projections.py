"""The shared frozen random projections A (r, in_max) and B (out_max, r), and their fingerprint.

Reproducibility is the contract: an adapter file stores the seed, not A and B, so the same seed
must give the same bits on every machine and device count. What we pin:

- PRNG: `jax.random.key(seed, impl="threefry2x32")`, split once into (key_A, key_B);
- `jax_threefry_partitionable=True` (JAX's default since 0.5.0), forced while drawing: under it,
  random bits do not depend on how the output is sharded, so a mesh of any size draws the same
  A and B; with the flag off the stream is a different one;
- raw uint32 bits from `jax.random.bits`, turned into floats by exact arithmetic:
  u = (bits >> 9) * 2**-22 - 1 is exact in float32 (23-bit integer, power-of-two scale, a
  result representable in float32), so uniform(-bound, bound) = u * bound has one rounding,
  identical on every IEEE backend (no backend-specific uniform implementation involved).

Kaiming-uniform with fan_in = the matrix's second dimension, as the paper and HF PEFT:
bound = sqrt(6 / in_max) for A, sqrt(6 / r) for B. The ablation inits: "uniform" is the same
exact construction with bound 1; "kaiming_normal" uses `jax.random.normal` (std
sqrt(2 / fan_in)), whose float math is the backend's, so only the uniform inits are promised
bit-identical across backends (the fingerprint catches a difference either way).

Unshared projections (`share_projections=False`) draw layer l's A_l (r, in), B_l (out, r) from
`fold_in(key, crc32(layer path))`, so a layer's matrices do not depend on which others are
adapted.

Per-shape projections (`projections="per_shape"`) draw one pair A (r, in), B (out, r) per
distinct (in, out) shape from `fold_in(key, crc32("shape/<in>x<out>"))`, stored under the key
"<in>x<out>"; a shape's pair does not depend on which other shapes are adapted, and layers of one
shape share it (as VeRA shares its one pair), unsliced.

A change in JAX's threefry stream would change A and B; `fingerprint` (SHA-256 over names,
shapes, dtypes and bytes) is stored in every adapter file and checked on load.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..tree import flat_names, get_path, set_path

PRNG_IMPL = "threefry2x32"


def _draw(key: jax.Array, shape: tuple[int, int], init: str) -> jax.Array:
    if init == "kaiming_normal":
        return jax.random.normal(key, shape, jnp.float32) * np.float32(math.sqrt(2.0 / shape[1]))
    bound = np.float32(1.0 if init == "uniform" else math.sqrt(6.0 / shape[1]))
    bits = jax.random.bits(key, shape, jnp.uint32)
    unit = (bits >> 9).astype(jnp.float32) * jnp.float32(2.0**-22) - jnp.float32(1.0)
    return unit * bound


def _pair(key: jax.Array, r: int, n_in: int, n_out: int, init: str) -> dict[str, jax.Array]:
    key_a, key_b = jax.random.split(key)
    return {"A": _draw(key_a, (r, n_in), init), "B": _draw(key_b, (n_out, r), init)}


def make_projections(seed: int, r: int, in_max: int, out_max: int,
                     init: str = "kaiming_uniform") -> dict[str, jax.Array]:
    """A (r, in_max) and B (out_max, r), float32, from one seed (traceable: works under jit,
    eval_shape and inside a mesh; the values never depend on the sharding)."""
    with jax.threefry_partitionable(True):
        return _pair(jax.random.key(seed, impl=PRNG_IMPL), r, in_max, out_max, init)


def make_layer_projections(seed: int, r: int, layers: Sequence, init: str = "kaiming_uniform") -> dict:
    """Unshared projections: {module path...: {"A": (r, in), "B": (out, r)}} for each LayerSpec."""
    out: dict = {}
    with jax.threefry_partitionable(True):
        key = jax.random.key(seed, impl=PRNG_IMPL)
        for spec in layers:
            layer_key = jax.random.fold_in(key, zlib.crc32(spec.name.encode()))
            set_path(out, spec.path, _pair(layer_key, r, spec.in_features, spec.out_features, init))
    return out


def shape_key(spec) -> str:
    """The per-shape projections' key of a layer: "<in>x<out>"."""
    return f"{spec.in_features}x{spec.out_features}"


def make_shape_projections(seed: int, r: int, layers: Sequence, init: str = "kaiming_uniform") -> dict:
    """Per-shape projections: {"<in>x<out>": {"A": (r, in), "B": (out, r)}} for each distinct shape."""
    out: dict = {}
    with jax.threefry_partitionable(True):
        key = jax.random.key(seed, impl=PRNG_IMPL)
        for spec in layers:
            name = shape_key(spec)
            if name not in out:
                shape_key_ = jax.random.fold_in(key, zlib.crc32(f"shape/{name}".encode()))
                out[name] = _pair(shape_key_, r, spec.in_features, spec.out_features, init)
    return out


def build(config, layers: Sequence) -> dict:
    """The projections a VeRA-family config asks for on `layers`: shared, per layer or per shape."""
    if not config.share_projections:
        return make_layer_projections(config.seed, config.r, layers, config.projection_init)
    if config.projections == "per_shape":
        return make_shape_projections(config.seed, config.r, layers, config.projection_init)
    in_max = max(s.in_features for s in layers)
    out_max = max(s.out_features for s in layers)
    return make_projections(config.seed, config.r, in_max, out_max, config.projection_init)


def layer_pair(projections: Mapping, config, spec) -> tuple[jax.Array, jax.Array]:
    """(A_l (r, in), B_l (out, r)) of one layer: slices of the shared pair, the layer's own pair,
    or its shape's pair."""
    if not config.share_projections:
        own = get_path(projections, spec.path)
    elif config.projections == "per_shape":
        own = projections[shape_key(spec)]
    else:
        return projections["A"][:, : spec.in_features], projections["B"][: spec.out_features, :]
    return own["A"], own["B"]


def fingerprint(projections: Mapping) -> str:
    """SHA-256 hex digest of the projections (a dict of arrays, possibly nested): names, shapes,
    dtypes and bytes, in name order."""
    h = hashlib.sha256()
    flat = flat_names(projections)
    for name in sorted(flat):
        arr = np.ascontiguousarray(np.asarray(jax.device_get(flat[name])))
        h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()
