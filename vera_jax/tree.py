"""Nested-dict helpers shared by the adapters, the model importers and interop: the one walker
over params-like trees (mappings of mappings of leaves).

A path is the tuple of keys leading to a node, kept as they are: strings in linen params,
integers too in flax.nnx params (an `nnx.List` of layers gives keys 0, 1, ...), so `flatten`,
`get_path` and `set_path` round-trip on any tree. `path_str` joins the keys' `str()` with '/',
the form targets are matched on (`matches`) and files name tensors by.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Hashable, Mapping

Path = tuple[Hashable, ...]
_NAME = re.compile(r"[A-Za-z0-9_/]+")


def flatten(tree) -> dict[Path, Any]:
    """{path: leaf} for every leaf (anything not a Mapping), in tree order; empty mappings vanish
    and a lone leaf is {(): leaf}."""
    out: dict[Path, Any] = {}

    def walk(node, path):
        if isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, path + (key,))
        else:
            out[path] = node

    walk(tree, ())
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict:
    """Inverse of `flatten` (for a tree of plain dicts)."""
    out: dict = {}
    for path, leaf in flat.items():
        set_path(out, path, leaf)
    return out


def flat_names(tree) -> dict[str, Any]:
    """{path_str(path): leaf}: `flatten` with '/'-joined names (tensor names in files)."""
    return {path_str(path): leaf for path, leaf in flatten(tree).items()}


def path_str(path: Path) -> str:
    """'/'.join of the keys' str(): `('layers', 0, 'q')` -> 'layers/0/q'."""
    return "/".join(str(key) for key in path)


def get_path(tree: Mapping, path: Path):
    """tree[path[0]][path[1]]..."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: Path, value) -> None:
    """Sets tree[path[0]]...[path[-1]] = value, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def matches(pattern: str, path: str) -> bool:
    """PEFT's target rule on '/'-joined paths: a pattern made only of letters, digits, '_' and '/'
    is a *name*, matching a path equal to it or ending in '/' + it ("query" matches every module
    whose last name is `query`); any other pattern is a regex full-matched on the path. Adapter
    targets and quantization skips both use it."""
    if _NAME.fullmatch(pattern):
        return path == pattern or path.endswith("/" + pattern)
    return re.fullmatch(pattern, path) is not None


def prefix_rules(path: Path, rules) -> tuple[tuple[int, int], ...]:
    """((position, n), ...) for each prefix `path[:position + 1]` that one of `rules` ((pattern, n)
    pairs, first match wins) matches: where the `stacked_axes` rule puts a path's layer axes."""
    points = []
    for t in range(1, len(path) + 1):
        name = path_str(path[:t])
        n = next((n for pattern, n in rules if matches(pattern, name)), 0)
        if n:
            points.append((t - 1, n))
    return tuple(points)


# Stacked (scanned) layers: the one rule for where a kernel's layer axes and input axes are, read by
# the adapters (`find_targets`) and by `quant.quantize_params`, so both see the same layers.
DEFAULT_LAYER_AXIS_NAMES = ("layers",)


def axis_names(params: Any) -> dict[Path, tuple]:
    """Leaf path -> the axis names of every boxed leaf (flax `nn.Partitioned`, `LogicallyPartitioned`:
    anything with `.names` and `.value`) of a linen params tree; {} for plain arrays."""
    out = {}

    def walk(node, path):
        if isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, path + (key,))
        elif hasattr(node, "names") and hasattr(node, "value"):
            out[path] = tuple(node.names)

    walk(params, ())
    return out


def _metadata_stacks(names: Mapping[Path, tuple], layer_names: tuple[str, ...], owner: str) -> dict:
    """Module path -> stack points from partitioning metadata: a kernel's leading axes named in
    `layer_names` are layer axes, each belonging to the highest module all of whose boxed params
    carry it (the module nn.scan built)."""
    lead, below = {}, {}
    for path, axes in names.items():
        n = 0
        while n < len(axes) and axes[n] in layer_names:
            n += 1
        if any(a in layer_names for a in axes[n:]):
            raise ValueError(f"{owner}.layer_axis_names: param {path_str(path)} names its axes {axes}; a layer axis "
                             f"({list(layer_names)}) must come before every other axis")
        lead[path] = n
        for t in range(1, len(path)):
            below[path[:t]] = min(below.get(path[:t], n), n)
    stacks = {}
    for path, n in lead.items():
        if path[-1] != "kernel" or not n:
            continue
        module = path[:-1]
        points, have = [], 0
        for t in range(1, len(module) + 1):
            count = n if t == len(module) else min(below.get(module[:t], 0), n)
            if count > have:
                points.append((t - 1, count - have))
                have = count
        stacks[module] = tuple(points)
    return stacks


def layer_stacks(names: Mapping[Path, tuple] | None, stacked_axes, layer_axis_names,
                 owner: str) -> Callable[[Path], tuple[tuple[int, int], ...]]:
    """module path -> its stack points ((position of a scanned module in the path, its number of
    layer axes), ...): the `stacked_axes` rules ((pattern, n) pairs) where one matches the path,
    else the partitioning metadata `names` (`axis_names` of the boxed params: leading axes named in
    `layer_axis_names`). `owner` starts the error messages (`VeraConfig`, `quantize_params`)."""
    meta = _metadata_stacks(names or {}, tuple(layer_axis_names), owner)
    return lambda path: prefix_rules(path, stacked_axes) or meta.get(path, ())


def input_axes(path: Path, shape: tuple, stack, in_axes_rules, layer_axis_names, owner: str) -> int:
    """The number of input axes of the kernel of module `path` (shape `shape`, layer axes `stack`
    from `layer_stacks`): its `kernel_in_axes` rule's, else 1. ValueError, one line naming the
    module, the shape and the field to set, when the axes left after the layer axes form no (in,
    out) map or more than two are left and no rule explains them (never guessed)."""
    name = path_str(path)
    stacked = sum(n for _, n in stack)
    rest = len(shape) - stacked
    in_axes = next((n for pattern, n in in_axes_rules if matches(pattern, name)), None)
    if rest < 2:
        raise ValueError(f"{owner}.stacked_axes: module {name} has a kernel of shape {shape}; its {stacked} layer "
                         "axes leave no (in, out) map")
    if in_axes is not None and in_axes >= rest:
        raise ValueError(f"{owner}.kernel_in_axes: module {name} has a kernel of shape {shape}; {in_axes} input "
                         f"axes leave no output axis" + (f" after its {stacked} layer axes" if stacked else ""))
    if in_axes is None and rest > 2:
        layer_names = tuple(layer_axis_names) or DEFAULT_LAYER_AXIS_NAMES
        raise ValueError(
            f"{owner}.stacked_axes: module {name} has a kernel of shape {shape} whose axes no rule explains; set "
            f"stacked_axes={{'<scanned module>': n}} (or partitioning metadata naming the axis "
            f"{layer_names[0]!r}) for n layer axes stacked by nn.scan / nnx.vmap, or "
            f"kernel_in_axes={{'{name}': k}} for a kernel with k input axes and the rest outputs")
    return 1 if in_axes is None else in_axes
