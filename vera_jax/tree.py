"""Nested-dict helpers shared by the adapters and the model importers."""

from __future__ import annotations

from typing import Mapping


def get_path(tree: Mapping, path: tuple[str, ...]):
    """tree[path[0]][path[1]]..."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    """Sets tree[path[0]]...[path[-1]] = value, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
