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
bound = sqrt(6 / in_max) for A, sqrt(6 / r) for B.

A change in JAX's threefry stream would change A and B; `fingerprint` (SHA-256 over names,
shapes, dtypes and bytes) is stored in every adapter file and checked on load.
"""

from __future__ import annotations

import hashlib
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

PRNG_IMPL = "threefry2x32"


def _kaiming_uniform(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    bound = np.float32(math.sqrt(6.0 / shape[1]))
    bits = jax.random.bits(key, shape, jnp.uint32)
    unit = (bits >> 9).astype(jnp.float32) * jnp.float32(2.0**-22) - jnp.float32(1.0)
    return unit * bound


def make_projections(seed: int, r: int, in_max: int, out_max: int) -> dict[str, jax.Array]:
    """A (r, in_max) and B (out_max, r), float32, from one seed (traceable: works under jit,
    eval_shape and inside a mesh; the values never depend on the sharding)."""
    with jax.threefry_partitionable(True):
        key = jax.random.key(seed, impl=PRNG_IMPL)
        key_a, key_b = jax.random.split(key)
        return {"A": _kaiming_uniform(key_a, (r, in_max)), "B": _kaiming_uniform(key_b, (out_max, r))}


def fingerprint(projections: Mapping[str, jax.Array]) -> str:
    """SHA-256 hex digest of the projections: names, shapes, dtypes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(projections):
        arr = np.ascontiguousarray(np.asarray(jax.device_get(projections[name])))
        h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()
