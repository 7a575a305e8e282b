"""Which layers an adapter touches, found on the param tree alone.

A *module* is a dict in the params tree; a *linear module* is one holding a `kernel` leaf with
two or more axes (nn.Dense, nn.DenseGeneral, nnx.Linear). Its path is the tuple of dict keys
leading to it, kept as they are (nnx lists give integer keys) and written as their str()s
'/'-joined in patterns and files (`encoder/layer_0/attention/query`, `layers/0/q`).

Patterns follow `vera_jax.tree.matches` (PEFT's rule, on '/' instead of '.'): a name matches a
path equal to it or ending in '/' + it; any other pattern is a regex full-matched on the path.

Kernel rule: a kernel of shape (i_1..i_k, o_1..o_m) is the linear map (prod i, prod o), with
k = 1 unless `kernel_in_axes` names the module (DenseGeneral with `axis=(-2, -1)`, an attention
output projection (heads, head_dim, embed), needs k = 2). Flattening is C-order reshape, which
is what DenseGeneral's contraction does.
"""

from __future__ import annotations

import math
from typing import Hashable, Iterable, Mapping, NamedTuple

import numpy as np

from ..tree import flatten, matches, path_str


class LayerSpec(NamedTuple):
    """One adapted linear layer: where it is and its flattened (in, out) shape."""

    path: tuple[Hashable, ...]
    kernel_shape: tuple[int, ...]
    in_axes: int

    @property
    def name(self) -> str:
        return path_str(self.path)

    @property
    def in_features(self) -> int:
        return math.prod(self.kernel_shape[: self.in_axes])

    @property
    def out_features(self) -> int:
        return math.prod(self.kernel_shape[self.in_axes :])


def layer_index(path: tuple[Hashable, ...], layer_names: Iterable[str]) -> int | None:
    """The block index in a path: `layer_3`, `layer/3` or nnx's `layers/3` with an integer key
    (for any name in `layer_names`)."""
    names = set(layer_names)
    parts = [str(part) for part in path]
    for i, part in enumerate(parts):
        head, _, tail = part.rpartition("_")
        if head in names and tail.isdigit():
            return int(tail)
        if part.isdigit() and i > 0 and parts[i - 1] in names:
            return int(part)
    return None


def linear_modules(params: Mapping) -> dict[tuple[Hashable, ...], tuple[int, ...]]:
    """Every linear module's path -> kernel shape, in tree order."""
    return {path[:-1]: tuple(np.shape(leaf)) for path, leaf in flatten(params).items()
            if path and path[-1] == "kernel" and len(np.shape(leaf)) >= 2}


def abbreviate(paths: Iterable[str], limit: int = 12) -> str:
    paths = list(paths)
    shown = ", ".join(paths[:limit])
    return shown + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def find_targets(params: Mapping, config) -> tuple[LayerSpec, ...]:
    """The linear modules `config.targets` selects, as LayerSpecs; ValueError if none. A config
    without `layers_to_transform` / `layers_pattern` / `kernel_in_axes` (a registered method's
    own) adapts every layer, with one input axis per kernel."""
    modules = linear_modules(params)
    in_axes_rules = getattr(config, "kernel_in_axes", ())
    layers_to_transform = getattr(config, "layers_to_transform", None)
    specs = []
    for path, shape in modules.items():
        name = path_str(path)
        if not any(matches(t, name) for t in config.targets):
            continue
        if layers_to_transform is not None:
            if layer_index(path, config.layers_pattern) not in layers_to_transform:
                continue
        in_axes = next((n for pattern, n in in_axes_rules if matches(pattern, name)), 1)
        if in_axes >= len(shape):
            raise ValueError(
                f"{type(config).__name__}.kernel_in_axes: module {name} has a kernel of shape {shape}; "
                f"{in_axes} input axes leave no output axis"
            )
        specs.append(LayerSpec(path, shape, in_axes))
    if not specs:
        where = "" if layers_to_transform is None else f" in layers {list(layers_to_transform)}"
        raise ValueError(
            f"{type(config).__name__}.targets: {list(config.targets)} matched no linear module{where}. "
            f"Linear modules in these params: {abbreviate(path_str(p) for p in modules) or 'none'}"
        )
    return tuple(specs)


def find_extra(params: Mapping, patterns: tuple[str, ...],
               field: str = "trainable_extra") -> tuple[tuple[Hashable, ...], ...]:
    """Leaf paths under any module matching one of `patterns` (e.g. every leaf of `classifier`)."""
    if not patterns:
        return ()
    paths = list(flatten(params))
    modules = list(dict.fromkeys(path[:k] for path in paths for k in range(1, len(path))))
    chosen = {m for m in modules if any(matches(p, path_str(m)) for p in patterns)}
    leaves = tuple(path for path in paths if any(path[:k] in chosen for k in range(1, len(path))))
    if not leaves:
        raise ValueError(
            f"{field}: {list(patterns)} matched no module. Modules: {abbreviate(path_str(m) for m in modules)}")
    return leaves
