"""Which layers an adapter touches, found on the param tree alone.

A *module* is a dict in the params tree; a *linear module* is one holding a `kernel` leaf with
two or more axes (nn.Dense, nn.DenseGeneral). Its path is the tuple of dict keys leading to it,
written '/'-joined in patterns and files (`encoder/layer_0/attention/query`).

Pattern rule (PEFT's, on '/' instead of '.'): a pattern made only of letters, digits, '_' and
'/' is a *name*: it matches a path equal to it or ending in '/' + it ("query" matches every
module whose last name is `query`). Any other pattern is a regex full-matched on the path.

Kernel rule: a kernel of shape (i_1..i_k, o_1..o_m) is the linear map (prod i, prod o), with
k = 1 unless `kernel_in_axes` names the module (DenseGeneral with `axis=(-2, -1)`, an attention
output projection (heads, head_dim, embed), needs k = 2). Flattening is C-order reshape, which
is what DenseGeneral's contraction does.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np

_NAME = re.compile(r"[A-Za-z0-9_/]+")


class LayerSpec(NamedTuple):
    """One adapted linear layer: where it is and its flattened (in, out) shape."""

    path: tuple[str, ...]
    kernel_shape: tuple[int, ...]
    in_axes: int

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def in_features(self) -> int:
        return math.prod(self.kernel_shape[: self.in_axes])

    @property
    def out_features(self) -> int:
        return math.prod(self.kernel_shape[self.in_axes :])


def matches(pattern: str, path: str) -> bool:
    if _NAME.fullmatch(pattern):
        return path == pattern or path.endswith("/" + pattern)
    return re.fullmatch(pattern, path) is not None


def layer_index(path: tuple[str, ...], layer_names: Iterable[str]) -> int | None:
    """The block index in a path: `layer_3` or `layer/3` (for any name in `layer_names`)."""
    names = set(layer_names)
    for i, part in enumerate(path):
        head, _, tail = part.rpartition("_")
        if head in names and tail.isdigit():
            return int(tail)
        if part.isdigit() and i > 0 and path[i - 1] in names:
            return int(part)
    return None


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(np.shape(leaf))


def linear_modules(params: Mapping) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every linear module's path -> kernel shape, in tree order."""
    found = {}

    def walk(node, path):
        if not isinstance(node, Mapping):
            return
        kernel = node.get("kernel")
        if kernel is not None and not isinstance(kernel, Mapping) and len(_shape(kernel)) >= 2:
            found[path] = _shape(kernel)
        for key, child in node.items():
            walk(child, path + (str(key),))

    walk(params, ())
    return found


def abbreviate(paths: Iterable[str], limit: int = 12) -> str:
    paths = list(paths)
    shown = ", ".join(paths[:limit])
    return shown + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def find_targets(params: Mapping, config) -> tuple[LayerSpec, ...]:
    """The linear modules `config.targets` selects, as LayerSpecs; ValueError if none."""
    modules = linear_modules(params)
    in_axes_rules = config.kernel_in_axes
    specs = []
    for path, shape in modules.items():
        name = "/".join(path)
        if not any(matches(t, name) for t in config.targets):
            continue
        if config.layers_to_transform is not None:
            if layer_index(path, config.layers_pattern) not in config.layers_to_transform:
                continue
        in_axes = next((n for pattern, n in in_axes_rules if matches(pattern, name)), 1)
        if in_axes >= len(shape):
            raise ValueError(
                f"{type(config).__name__}.kernel_in_axes: module {name} has a kernel of shape {shape}; "
                f"{in_axes} input axes leave no output axis"
            )
        specs.append(LayerSpec(path, shape, in_axes))
    if not specs:
        where = "" if config.layers_to_transform is None else f" in layers {list(config.layers_to_transform)}"
        raise ValueError(
            f"{type(config).__name__}.targets: {list(config.targets)} matched no linear module{where}. "
            f"Linear modules in these params: {abbreviate('/'.join(p) for p in modules) or 'none'}"
        )
    return tuple(specs)


def find_extra(params: Mapping, patterns: tuple[str, ...], field: str = "trainable_extra") -> tuple[tuple[str, ...], ...]:
    """Leaf paths under any module matching one of `patterns` (e.g. every leaf of `classifier`)."""
    if not patterns:
        return ()
    leaves, modules = [], set()

    def walk(node, path, inside):
        if isinstance(node, Mapping):
            if path and any(matches(p, "/".join(path)) for p in patterns):
                inside = True
                modules.add("/".join(path))
            for key, child in node.items():
                walk(child, path + (str(key),), inside)
        elif inside:
            leaves.append(path)

    walk(params, (), False)
    if not leaves:
        all_modules = []

        def collect(node, path):
            if isinstance(node, Mapping):
                if path:
                    all_modules.append("/".join(path))
                for key, child in node.items():
                    collect(child, path + (str(key),))

        collect(params, ())
        raise ValueError(f"{field}: {list(patterns)} matched no module. Modules: {abbreviate(all_modules)}")
    return tuple(leaves)
