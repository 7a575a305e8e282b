"""Layer hooks: run a linen model as it is and change what chosen Dense-like layers return.

A layer is found by its module's scope path, which is its kernel's param path (`LayerSpec.path`);
its input is the call's first argument, flattened over the kernel's input axes (DenseGeneral
contracts the trailing ones). The factored and auto paths (`factored.call_adapted`), the serving
bank's per-row terms (`serving.batched`) and the serving benchmark all intercept this one way.
flax.nnx modules are plain Python calls that `flax.linen.intercept_methods` never sees; their
layers are hooked by `nnx_hooks.layer_hooks`, which hands the hook the same `LayerCall`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax

from .targets import LayerSpec


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One intercepted call of a hooked layer."""

    spec: LayerSpec
    module: Any  # the linen Module (an nnx Module for `nnx_hooks.NnxLayerCall`)
    args: tuple
    kwargs: dict
    next_fun: Callable

    @property
    def x(self) -> jax.Array:
        """The input flattened over the kernel's input axes: (..., in_features)."""
        x = self.args[0]
        return x.reshape(x.shape[: x.ndim - self.spec.in_axes] + (self.spec.in_features,))

    @property
    def tokens(self) -> int:
        """Input rows the layer sees (every axis but the contracted ones)."""
        x = self.args[0]
        return math.prod(x.shape[: x.ndim - self.spec.in_axes])

    @property
    def params(self) -> dict:
        """The layer's own params (kernel, bias)."""
        return self.module.variables["params"]

    def run(self) -> Any:
        """The call as the model makes it."""
        return self.next_fun(*self.args, **self.kwargs)

    def run_with(self, **params) -> Any:
        """The call on an unbound copy of the module whose params named here are replaced
        (e.g. `kernel=W0 + delta`)."""
        own = {**self.module.variables["params"], **params}
        return self.module.clone(parent=None).apply({"params": own}, *self.args, **self.kwargs)

    def add(self, term: jax.Array) -> jax.Array:
        """The call's output plus `term` (..., out), added in the wider of their dtypes (a float32
        term is not rounded to a low-precision output before the sum), returned in the output's."""
        out = self.run()
        return (out + term.reshape(out.shape)).astype(out.dtype)


@contextlib.contextmanager
def layer_hooks(specs: Iterable[LayerSpec], hook: Callable[[LayerCall], Any]):
    """Inside this context, each `__call__` of a linen module whose scope path is one of `specs`'
    paths (and that has a positional input) returns `hook(call)`; every other call runs as is."""
    by_path = {spec.path: spec for spec in specs}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        spec = by_path.get(tuple(module.scope.path)) if context.method_name == "__call__" and module.scope else None
        if spec is None or not args:
            return next_fun(*args, **kwargs)
        return hook(LayerCall(spec, module, args, kwargs, next_fun))

    with nn.intercept_methods(interceptor):
        yield
