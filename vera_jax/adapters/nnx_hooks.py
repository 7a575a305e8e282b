"""Layer hooks for flax.nnx: the `hooks.layer_hooks` contract (a `LayerCall` per adapted layer's
call) for nnx.Linear, nnx.LinearGeneral and nnx.Einsum, and quantized nnx kernels run dequantized.

Mechanism: while a context here is active, those three classes' `__call__` (and so any subclass
that does not replace it) goes through a chain of interceptors kept in a ContextVar; a layer is
recognised by the identity of its kernel's value with a leaf of the params handed to `fn`
(`nnx.merge(graphdef, params, rest)` keeps the arrays it is given, the leaves of a quantized kernel
too). Outside the contexts, or for any other instance, the original call runs.

Why the modules' calls and not `jax.lax.dot_general` (qwix's way): nnx.Linear binds its
`dot_general` at construction and nnx.Einsum calls its own `einsum_op`, so a patched
`lax.dot_general` never sees them unless the model is rewritten (qwix swaps the model's class and
writes each submodule's path onto it, which needs the model object, not a params dict); the dot's
operands are the dtype-promoted copies, not the params' arrays; a quantized kernel never reaches a
dot (`promote_dtype` fails on it first); and the adapter needs the whole layer (input, output,
bias: DVoRA's rescale, auto's merged branch re-running the layer on W0 + delta), which is what
`LayerCall` carries for linen. So linen and nnx share `factored.call_adapted`'s per-layer logic.

A layer whose call does not map onto its spec's (in, out) kernel (LinearGeneral over other axes or
with batch axes; an Einsum that does not contract the kernel's input axes with the input's last
ones and keep the rest in order) raises, naming the layer.

Stacked layers (`nnx.vmap`/`nnx.scan` over layers) are called on slices, not on the params'
leaves, so their kernels are handed over as `Carried` nodes: the kernel, the entries the
adapter needs per layer, and the layer's path as static data; nnx's transforms slice every array
in it, and the hook gets the layer's own slices as extra entries of `LayerCall.params`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import threading
from typing import Any, Callable, Iterable

import jax
from flax import nnx, struct

from .. import quant
from ..tree import get_path, set_path
from .hooks import LayerCall
from .targets import LayerSpec

LAYER_CLASSES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
Interceptor = Callable[[nnx.Module, Callable, tuple, dict], Any]  # (module, next_call, args, kwargs)

_ACTIVE: contextvars.ContextVar[tuple[Interceptor, ...]] = contextvars.ContextVar("vera_nnx_hooks", default=())
_lock = threading.Lock()
_installed = {"count": 0, "originals": {}}


def _intercepted(original: Callable) -> Callable:
    def __call__(self, *args, **kwargs):
        chain = _ACTIVE.get()

        def at(i: int) -> Callable:
            """The rest of the chain from interceptor i, as `next_call(module, *args, **kwargs)`."""
            if i == len(chain):
                return original
            return lambda module, *a, **k: chain[i](module, at(i + 1), a, k)

        return at(0)(self, *args, **kwargs)

    __call__.__wrapped__ = original
    return __call__


@contextlib.contextmanager
def _intercepting(interceptor: Interceptor):
    """Runs `interceptor` around every call of the LAYER_CLASSES inside the context (the one
    entered first is outermost, as linen's `intercept_methods`)."""
    with _lock:
        if _installed["count"] == 0:
            for cls in LAYER_CLASSES:
                _installed["originals"][cls] = cls.__dict__["__call__"]
                cls.__call__ = _intercepted(cls.__dict__["__call__"])
        _installed["count"] += 1
    token = _ACTIVE.set(_ACTIVE.get() + (interceptor,))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        with _lock:
            _installed["count"] -= 1
            if _installed["count"] == 0:
                for cls, original in _installed["originals"].items():
                    cls.__call__ = original
                _installed["originals"].clear()


def _own(module: nnx.Module) -> dict:
    """The module's params as values: kernel, and bias when it has one."""
    own = {"kernel": module.kernel.get_value()}
    if getattr(module, "bias", None) is not None:
        own["bias"] = module.bias.get_value()
    return own


def _identity(value) -> int:
    """What ties a module's kernel to a params leaf: the array itself, or a quantized kernel's
    first array (nnx rebuilds the QuantizedKernel node around the same arrays)."""
    return id(jax.tree.leaves(value)[0])


def _copy_with(module: nnx.Module, params: dict) -> nnx.Module:
    """A copy of the module whose variables named in `params` hold those values. A copy, built in
    the current trace: nnx refuses to set a Variable made outside it (under grad, custom_vjp)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, {**state.to_pure_dict(), **params})


@dataclasses.dataclass(frozen=True)
class NnxLayerCall(LayerCall):
    """One intercepted call of a hooked nnx layer (`module` is the nnx Module; `next_fun` the rest
    of the chain on it, `next_call` the same for any module; `carried`: a stacked layer's slices)."""

    next_call: Callable = None
    carried: dict = dataclasses.field(default_factory=dict)

    @property
    def params(self) -> dict:
        return {**_own(self.module), **self.carried}

    def run_with(self, **params) -> Any:
        return self.next_call(_copy_with(self.module, params), *self.args, **self.kwargs)


@struct.dataclass
class Carried:
    """A stacked layer's kernel as handed to the model: the kernel, what the adapter needs per
    layer (`carried`, each with the layer axes leading), and the layer's path (static)."""

    kernel: Any
    carried: dict
    path: tuple = struct.field(pytree_node=False)


def carry(params: dict, carried: dict) -> dict:
    """`params` with the kernel of each module path in `carried` (path -> entries) as a `Carried`."""
    if not carried:
        return params
    params = jax.tree.map(lambda x: x, params, is_leaf=quant.is_quantized)
    for path, entries in carried.items():
        set_path(params, path + ("kernel",), Carried(get_path(params, path)["kernel"], entries, path))
    return params


def _einsum_fits(equation: str, in_axes: int, kernel_ndim: int) -> bool:
    lhs, _, out = equation.replace(" ", "").partition("->")
    x, _, kernel = lhs.partition(",")
    return (len(kernel) == kernel_ndim and x.endswith(kernel[:in_axes])
            and out == x[: len(x) - in_axes] + kernel[in_axes:])


def _check_layout(spec: LayerSpec, module: nnx.Module, args: tuple, kwargs: dict) -> None:
    """ValueError unless the call computes x (..., in) @ kernel (in, out) as the spec reads it."""
    ndim = args[0].ndim
    if isinstance(module, nnx.LinearGeneral):
        axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        axes = tuple(sorted(a % ndim for a in axes))
        if module.batch_axis or axes != tuple(range(ndim - spec.in_axes, ndim)):
            raise ValueError(
                f"layer {spec.name}: nnx.LinearGeneral with axis={module.axis}, batch_axis={dict(module.batch_axis)} "
                f"does not contract the input's last {spec.in_axes} axes as kernel_in_axes reads its kernel; set "
                "kernel_in_axes for this layer to its number of contracted axes, or use path='merged'")
    elif isinstance(module, nnx.Einsum):
        equation = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
        if not _einsum_fits(equation, spec.in_axes, len(spec.kernel_shape)):
            raise ValueError(
                f"layer {spec.name}: nnx.Einsum {equation!r} does not map onto an (in, out) kernel with "
                f"{spec.in_axes} input axes (the kernel's first axes contracted with the input's last ones, "
                "the output = the input's other axes + the kernel's rest); use path='merged'")
    elif spec.in_axes != 1:
        raise ValueError(f"layer {spec.name}: {type(module).__name__} contracts one input axis, but "
                         f"kernel_in_axes gives it {spec.in_axes}")


@contextlib.contextmanager
def layer_hooks(specs: Iterable[LayerSpec], params: dict, hook: Callable[[LayerCall], Any]):
    """Inside this context, each call of an nnx layer whose kernel is the `kernel` leaf of one of
    `specs`' paths in `params` (the tree the model is built from) returns `hook(call)`; every
    other call runs as is; a stacked layer's kernel is a `Carried` (see `carry`) naming its path.
    Two specs sharing one kernel object would be ambiguous: ValueError."""
    by_kernel, by_path = {}, {}
    for spec in specs:
        if spec.stack:
            by_path[spec.path] = spec
            continue
        key = _identity(get_path(params, spec.path)["kernel"])
        if key in by_kernel:
            raise ValueError(f"layers {by_kernel[key].name} and {spec.name} hold the same kernel array; "
                             "give each layer its own array (e.g. jnp.array(kernel, copy=True))")
        by_kernel[key] = spec

    def interceptor(module, next_call, args, kwargs):
        kernel, carried = module.kernel.get_value(), {}
        if isinstance(kernel, Carried):
            spec, carried = by_path[kernel.path], kernel.carried
            module = _copy_with(module, {"kernel": kernel.kernel})
        else:
            spec = by_kernel.get(_identity(kernel))
        if spec is None or not args:
            return next_call(module, *args, **kwargs)
        _check_layout(spec.per_layer if spec.stack else spec, module, args, kwargs)
        return hook(NnxLayerCall(spec, module, args, kwargs, functools.partial(next_call, module), next_call,
                                 carried))

    with _intercepting(interceptor):
        yield


def _dequantizing(module, next_call, args, kwargs):
    kernel = module.kernel.get_value()
    if not args or not quant.is_quantized(kernel):
        return next_call(module, *args, **kwargs)
    x, rest_args = args[0], args[1:]
    bias = {k: v for k, v in _own(module).items() if k != "kernel"}

    def apply(kernel, rest, x):
        return next_call(_copy_with(module, {"kernel": kernel, **rest}), x, *rest_args, **kwargs)

    return quant._frozen_kernel_call(apply)(kernel, bias, x)


@contextlib.contextmanager
def dequantized():
    """Inside this context, nnx layers whose kernel is quantized run on it dequantized (per call,
    under quant's custom VJP: recomputed for the backward pass, no gradient to the kernel)."""
    with _intercepting(_dequantizing):
        yield


def maybe_dequantized(params):
    """`dequantized()` when `params` holds a quantized kernel, else a context that does nothing."""
    return dequantized() if quant.has_quantized(params) else contextlib.nullcontext()
