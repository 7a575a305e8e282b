"""Package namespaces whose names import their module on first use (PEP 562), so that importing
one light module of vera_jax (a config file needs `vera_jax.train.config`, `vera_jax.adapters.config`)
does not start JAX through the package `__init__`s above it."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Mapping, Sequence


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]) -> tuple[list[str], Callable, Callable]:
    """(`__all__`, `__getattr__`, `__dir__`) for `package`: each name of `exports[module]` is that
    module's attribute, imported when first read (`module` relative to `package` when it starts
    with "."); a subpackage or submodule name imports it, as an eager `__init__` would have."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name in where:
            value = getattr(importlib.import_module(where[name], package), name)
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return sorted(where), __getattr__, __dir__
