"""Nested-dict helpers shared by the adapters, the model importers and interop: the one walker
over params-like trees (mappings of mappings of leaves).

A path is the tuple of keys leading to a node, kept as they are: strings in linen params,
integers too in flax.nnx params (an `nnx.List` of layers gives keys 0, 1, ...), so `flatten`,
`get_path` and `set_path` round-trip on any tree. `path_str` joins the keys' `str()` with '/',
the form targets are matched on (`matches`) and files name tensors by.
"""

from __future__ import annotations

import re
from typing import Any, Hashable, Mapping

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
