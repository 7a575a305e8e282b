"""Device meshes and logical-axis shardings, below both models (which place a checkpoint as it
loads) and train (which shards params and batches the same way): the same code on 1 CPU or a pod."""

from __future__ import annotations

import logging
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1 and takes the remaining devices."""
    devices = jax.devices() if devices is None else devices
    sizes = [int(mesh_config[a]) for a in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of {AXES} may be -1, got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices not divisible by {dict(zip(AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return Mesh(grid, AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axes) -> NamedSharding:
    """Leading (batch) dimension split over `batch_axes`, the rest replicated."""
    return NamedSharding(mesh, P(tuple(batch_axes)))


def batch_divisor(mesh: Mesh, batch_axes) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes)


def _fit(spec: P, shape, mesh: Mesh, name: str) -> P:
    """Drops mesh axes that do not divide their dimension (that dimension is replicated instead)."""
    parts = list(spec) + [None] * (len(shape) - len(spec))
    out = []
    for dim, part in zip(shape, parts):
        axes = (part,) if isinstance(part, str) else tuple(part or ())
        size = math.prod(mesh.shape[a] for a in axes)
        if size > 1 and dim % size:
            logging.warning("sharding: %s dim %d not divisible by mesh axes %s (%d); replicating it",
                            name, dim, axes, size)
            part = None
        out.append(part)
    return P(*out)


def param_shardings(params, logical_axes, mesh: Mesh, rules) -> Any:
    """NamedSharding per leaf of `params` from its logical axis names (e.g. nn.get_partition_spec
    of the boxed params from model.init) and `rules`; leaves without names are replicated."""
    if logical_axes is None:
        return jax.tree.map(lambda _: replicated(mesh), params)
    rules = tuple((k, v) for k, v in rules)
    flat_axes = {jax.tree_util.keystr(k): v for k, v in
                 jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=lambda x: isinstance(x, P))[0]}

    def one(path, x):
        name = jax.tree_util.keystr(path)
        names = flat_axes.get(name, P())
        if names is None:
            names = P()
        spec = nn.logical_to_mesh_axes(tuple(names), rules)
        return NamedSharding(mesh, _fit(spec, np.shape(x), mesh, name))

    return jax.tree_util.tree_map_with_path(one, params)


def put(tree, shardings):
    """Host (numpy or single-device) arrays -> global arrays with `shardings`; each process reads
    only the slices its devices hold, so it works on any number of processes."""
    def one(x, s):
        if x is None:
            return None
        x = np.asarray(x) if not isinstance(x, jax.Array) or x.is_fully_addressable else x
        return jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x[idx]))

    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: x is None)


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows of the global batch -> global arrays (rows ordered by process)."""
    n = jax.process_count()

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * n,) + x.shape[1:])

    return jax.tree.map(one, local_batch)
