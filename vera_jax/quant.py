"""Quantized frozen kernels (DESIGN contract 6): NF4 as QLoRA, or int8, kept quantized in device
memory and dequantized one layer at a time inside the jitted step.

    qparams = quant.quantize_params(params, "nf4")        # kernels -> NF4Kernel / Int8Kernel leaves
    adapted = vera_jax.apply_vera(qparams, config)         # the adapters see the kernels' shapes
    loss = vera_jax.call_adapted(loss_fn, adapted, batch, path="factored")   # or "auto"
    with quant.dequantized():                              # a plain model on a quantized tree
        logits = model.apply({"params": qparams}, ids)

nf4: 4-bit NormalFloat (QLoRA's 16 quantiles of N(0, 1) scaled to [-1, 1]), absmax blocks of
  `block_size` (64) consecutive inputs per output column (bitsandbytes' blocks of the flattened
  torch (out, in) weight), two codes per uint8 byte; the block absmaxes are double-quantized as
  QLoRA does: their mean subtracted, then int8 codes with one float32 scale per 256 of them along
  the output axis (gcd(out, 256) when out is no multiple), which stores 0.5 + 1/64 + 1/4096 bytes
  per parameter (bitsandbytes uses an 8-bit dynamic map for the second level; linear int8 has the
  same size and a simpler bound).
int8: symmetric per output channel, one float32 scale per column: 1 + 4/in bytes per parameter.
GGUF Q4_0 / Q4_1: a llama.cpp file's own blocks kept as stored (`models.gguf.keep_4bit`), 18 / 20
  bytes per 32 weights.

How a quantized layer runs: `dequantized()` intercepts every linen module call whose `kernel` param
is quantized and calls an unbound copy of that module on the dequantized kernel, under a custom
VJP whose backward pass dequantizes again once the output's cotangent exists, so no full-precision
copy of a layer is kept between the passes or made early (the frozen kernel gets no gradient; the
input's gradient needs the kernel; XLA drops the recomputed matmul). The model is not rewritten,
so any linen model built from Dense-like modules works, and the adapters' factored path (itself
an interception) composes with it. Nothing merges into a quantized kernel: `merge` refuses, and the
auto path factors quantized layers.

Why not qwix (0.1.8, tried on the tiny LLaMA): its PTQ `QArray` holds NF4 (tile 64) and int8
per-channel kernels, runs inside jit and even composes with our factored interception (the
adapter term survives, gradients flow). But (1) QLoRA's double-quantized scales cannot be
expressed: `QArray.scale` is a plain float array that `dequantize` multiplies by, so its NF4 costs
0.5625 bytes/parameter instead of 0.516; (2) it works by rewriting the model class
(`qwix.quantize_model`) and intercepting `jax.lax.dot_general` inside it, so every apply in the
trainer, the evals, generation and the auto path's merged branch would need the rewritten model
instead of the user's; (3) its param nodes (`WithAux` holding a `QArray` of uint4 codes and float
scales) cannot hold a GGUF file's Q4 blocks as stored, and our merged path and optax labels met
them unguarded (merge failed with "Unsupported type: QArray", labels on their attribute keys).
Its uint4 codes do take 0.5 bytes in XLA:CPU's argument figures, as ours do in uint8 pairs. The
part we need is small, so it is here, with QLoRA's numerics.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

from .tree import (
    DEFAULT_LAYER_AXIS_NAMES,
    axis_names,
    flatten,
    get_path,
    input_axes,
    layer_stacks,
    matches,
    path_str,
    set_path,
)

METHODS = ("nf4", "int8")
# QLoRA, Appendix E (bitsandbytes' NF4 table): quantiles of N(0, 1) normalised to [-1, 1], exact 0.
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
NF4_MAX_GAP = float(np.diff(NF4_CODEBOOK).max())  # a value is at most half this (times absmax) off
SCALE_GROUP = 256  # block absmaxes per second-level scale (QLoRA's double quantization)
DEFAULT_SKIP = ("lm_head", "classifier")  # output layers stay in full precision, as QLoRA keeps them


class QuantizedKernel:
    """A frozen (in, *out) kernel stored quantized; `shape`, `ndim`, `dtype` and `size` describe
    the full-precision kernel it stands for (what the adapters and cost model read).

    Stacked layers (an nn.scan's (L, in, out) kernel, `quantize_params(stacked_axes=...)`): each
    layer's slice is quantized on its own and every array gains the leading layer axes; the static
    `layer_shape` is one layer's, and `shape` adds the leading axes the arrays carry, so a slice
    (what nn.scan hands each iteration, or `x[i]` of every array) is a valid one-layer kernel."""

    layer_shape: tuple
    dtype_name: str
    _codes_ndim = 2  # axes of one layer's codes

    @property
    def shape(self) -> tuple:
        lead = self.codes.shape[: len(self.codes.shape) - self._codes_ndim]
        return tuple(lead) + tuple(self.layer_shape)

    def _dequantize_stacked(self):
        """One layer's dequantize vmapped over the leading layer axes, or None when there are none."""
        if len(self.codes.shape) == self._codes_ndim:
            return None
        return jax.vmap(type(self).dequantize)(self)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self):
        return jnp.dtype(self.dtype_name)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (codes and scales)."""
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))


@struct.dataclass
class NF4Kernel(QuantizedKernel):
    """codes: uint8 (in/2, out), rows 2i (low nibble) and 2i+1 (high); absmax: int8 (in/block, out);
    absmax_scale: float32 (in/block, out/group); absmax_offset: float32 (); out = prod(shape[1:])."""

    codes: jax.Array
    absmax: jax.Array
    absmax_scale: jax.Array
    absmax_offset: jax.Array
    layer_shape: tuple = struct.field(pytree_node=False)
    dtype_name: str = struct.field(pytree_node=False)
    block_size: int = struct.field(pytree_node=False, default=64)
    method = "nf4"

    def dequantize(self) -> jax.Array:
        stacked = self._dequantize_stacked()
        if stacked is not None:
            return stacked
        n_in, n_out = self.codes.shape[0] * 2, self.codes.shape[1]
        nibbles = jnp.stack([self.codes & 0xF, self.codes >> 4], axis=1).reshape(n_in, n_out)
        values = jnp.asarray(NF4_CODEBOOK)[nibbles.astype(jnp.int32)]
        group = n_out // self.absmax_scale.shape[1]
        absmax = (self.absmax.astype(jnp.float32) * jnp.repeat(self.absmax_scale.astype(jnp.float32), group, axis=1)
                  + self.absmax_offset.astype(jnp.float32))
        w = values.reshape(n_in // self.block_size, self.block_size, n_out) * absmax[:, None, :]
        return w.reshape(self.layer_shape).astype(self.dtype)


@struct.dataclass
class Int8Kernel(QuantizedKernel):
    """codes: int8 (in, out); scale: float32 (out,), the column's absmax / 127."""

    codes: jax.Array
    scale: jax.Array
    layer_shape: tuple = struct.field(pytree_node=False)
    dtype_name: str = struct.field(pytree_node=False)
    method = "int8"

    def dequantize(self) -> jax.Array:
        stacked = self._dequantize_stacked()
        if stacked is not None:
            return stacked
        w = self.codes.astype(jnp.float32) * self.scale.astype(jnp.float32)
        return w.reshape(self.layer_shape).astype(self.dtype)


@struct.dataclass
class GGUFQ4Kernel(QuantizedKernel):
    """A GGUF Q4_0 / Q4_1 weight kept in its stored blocks of 32 inputs, in HF's (out, in) row order
    (llama.cpp's layout): codes uint8 (out, in/32, 16), byte j of a block holding inputs j (low
    nibble) and j + 16 (high); scale float16 (out, in/32); minimum float16 (out, in/32) for Q4_1
    (value = q * scale + minimum), None for Q4_0 (value = (q - 8) * scale). `shape` is our (in, out)."""

    codes: jax.Array
    scale: jax.Array
    minimum: jax.Array | None
    layer_shape: tuple = struct.field(pytree_node=False)
    dtype_name: str = struct.field(pytree_node=False)
    method: str = struct.field(pytree_node=False, default="q4_0")
    _codes_ndim = 3

    @classmethod
    def from_blocks(cls, data: np.ndarray, method: str, shape_out_in: tuple[int, int]) -> "GGUFQ4Kernel":
        """From GGUF's raw rows (uint8 (out, in/32 * block bytes)); `method` "q4_0" | "q4_1"."""
        n_out, n_in = shape_out_in
        head = {"q4_0": 2, "q4_1": 4}[method]
        blocks = np.ascontiguousarray(data).reshape(n_out, n_in // 32, head + 16)
        scale = blocks[..., :2].copy().view(np.float16)[..., 0]
        minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0] if method == "q4_1" else None
        return cls(jnp.asarray(blocks[..., head:]), jnp.asarray(scale),
                   None if minimum is None else jnp.asarray(minimum), (n_in, n_out), "float32", method)

    def dequantize(self) -> jax.Array:
        stacked = self._dequantize_stacked()
        if stacked is not None:
            return stacked
        q = jnp.concatenate([self.codes & 0xF, self.codes >> 4], axis=-1).astype(jnp.float32)
        scale = self.scale.astype(jnp.float32)[..., None]
        w = q * scale + self.minimum.astype(jnp.float32)[..., None] if self.minimum is not None else (q - 8) * scale
        return w.reshape(self.layer_shape[1], self.layer_shape[0]).T.astype(self.dtype)


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedKernel)


def _nf4_codes(w):
    """Nearest NF4 code of each value of w (already divided by its block's absmax)."""
    mid = jnp.asarray((NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2)
    return jnp.searchsorted(mid, w, side="left").astype(jnp.uint8)


@functools.partial(jax.jit, static_argnums=1)
def _nf4_arrays(w, block_size: int):
    n_in, n_out = w.shape
    blocks = w.reshape(n_in // block_size, block_size, n_out)
    absmax = jnp.abs(blocks).max(axis=1)
    codes = _nf4_codes(blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None, :]).reshape(n_in, n_out)
    packed = (codes[0::2] | (codes[1::2] << 4)).astype(jnp.uint8)
    offset = absmax.mean()
    group = math.gcd(n_out, SCALE_GROUP)
    centred = (absmax - offset).reshape(absmax.shape[0], n_out // group, group)
    scale = jnp.abs(centred).max(axis=2) / 127.0
    q = jnp.round(centred / jnp.where(scale > 0, scale, 1.0)[..., None]).clip(-127, 127).astype(jnp.int8)
    return packed, q.reshape(absmax.shape), scale, offset


def quantize_nf4(kernel, block_size: int = 64, name: str = "kernel", in_axes: int = 1) -> NF4Kernel:
    """NF4 with double-quantized block absmaxes (see the module docstring); the kernel's first
    `in_axes` axes are its input (blocks run along them, flattened)."""
    shape, dtype = tuple(kernel.shape), jnp.dtype(kernel.dtype).name
    n_in = math.prod(shape[:in_axes])
    if block_size < 2 or block_size % 2 or n_in % block_size:
        raise ValueError(f"quantize: nf4 block_size {block_size} must be even and divide the input size {n_in} "
                         f"of {name} (kernel {shape}); allowed: an even divisor of {n_in}")
    arrays = _nf4_arrays(jnp.asarray(kernel, jnp.float32).reshape(n_in, -1), block_size)
    return NF4Kernel(*arrays, shape, dtype, block_size)


@jax.jit
def _int8_arrays(w):
    scale = jnp.abs(w).max(axis=0) / 127.0
    return jnp.round(w / jnp.where(scale > 0, scale, 1.0)).clip(-127, 127).astype(jnp.int8), scale


def quantize_int8(kernel, name: str = "kernel", in_axes: int = 1) -> Int8Kernel:
    """Symmetric int8 per output column (the axes after the first `in_axes`, flattened)."""
    shape, dtype = tuple(kernel.shape), jnp.dtype(kernel.dtype).name
    n_in = math.prod(shape[:in_axes])
    return Int8Kernel(*_int8_arrays(jnp.asarray(kernel, jnp.float32).reshape(n_in, -1)), shape, dtype)


def quantize_kernel(kernel, method: str, block_size: int = 64, name: str = "kernel",
                    stacked: int = 0, in_axes: int = 1) -> QuantizedKernel:
    """`kernel` quantized by `method`; its first `stacked` axes are layers (nn.scan), each layer's
    slice quantized on its own (its own blocks and scales), the arrays stacked on those axes; the
    next `in_axes` axes are a layer's input."""
    if stacked:
        lead = tuple(kernel.shape[:stacked])
        slices = jnp.asarray(kernel).reshape((-1,) + tuple(kernel.shape[stacked:]))
        parts = [quantize_kernel(slices[i], method, block_size, f"{name} (layer {i})", in_axes=in_axes)
                 for i in range(len(slices))]
        return jax.tree.map(lambda *xs: jnp.stack(xs).reshape(lead + xs[0].shape), *parts)
    if method == "nf4":
        return quantize_nf4(kernel, block_size, name, in_axes)
    if method == "int8":
        return quantize_int8(kernel, name, in_axes)
    raise ValueError(f"quantize: method {method!r} is not one of {list(METHODS)}")


def linear_paths(params, targets: Iterable[str] | None = None, skip: Iterable[str] = DEFAULT_SKIP) -> list[tuple]:
    """Module paths whose (>= 2-D) kernel `quantize_params` would quantize: those matching
    `targets` (default: every linear module) and no pattern of `skip` (names or regexes, as
    adapter targets are matched)."""
    skip = tuple(skip)
    out = []
    for path, leaf in flatten(params).items():
        if not path or path[-1] != "kernel" or len(np.shape(leaf)) < 2:
            continue
        name = path_str(path[:-1])
        if any(matches(s, name) for s in skip):
            continue
        if targets is None or any(matches(t, name) for t in targets):
            out.append(path[:-1])
    return out


def quantize_params(params, method: str, *, targets: Iterable[str] | None = None,
                    skip: Iterable[str] = DEFAULT_SKIP, block_size: int = 64, stacked_axes=(),
                    layer_axis_names: Iterable[str] = DEFAULT_LAYER_AXIS_NAMES, kernel_in_axes=()) -> dict:
    """A copy of the params tree with the chosen kernels quantized (`linear_paths`); other leaves
    are kept as they are. `method`: "nf4" | "int8".

    Stacked (scanned) layers are found by the adapters' rule (`tree.layer_stacks`): a kernel's
    leading axes named in `layer_axis_names` by flax partitioning metadata (boxed params, e.g. a
    scanned model's `model.init` with `metadata_params={nn.PARTITION_NAME: "layers"}`), or
    `stacked_axes` (pattern of a scanned module -> its number of leading layer axes), which wins;
    such a kernel is quantized one layer at a time. `kernel_in_axes` (pattern -> number of input
    axes, as the adapter configs' field) for a kernel with several input axes; a kernel with more
    than two axes that no rule explains is refused, never guessed. Boxed params come back boxed
    (each quantized kernel in its kernel's box), so `apply_vera` reads the same layer axes from
    them; `nn.unbox` them for `model.apply`."""
    if method not in METHODS:
        raise ValueError(f"quantize: method {method!r} is not one of {list(METHODS)}")
    names = axis_names(params) if isinstance(params, Mapping) else {}
    plain = flax.core.unfreeze(nn.meta.unbox(params)) if names else params
    out = jax.tree.map(lambda x: x, flax.core.unfreeze(params) if names else params, is_leaf=is_quantized)
    paths = linear_paths(plain, targets, skip)
    if not paths:
        raise ValueError(f"quantize: targets {None if targets is None else list(targets)} (skip {list(skip)}) "
                         "matched no linear module")
    owner = "quantize_params"
    rules = lambda value: tuple((value.items() if isinstance(value, Mapping) else value))  # noqa: E731
    layer_names = (layer_axis_names,) if isinstance(layer_axis_names, str) else tuple(layer_axis_names)
    stack_of = layer_stacks(names, rules(stacked_axes), layer_names, owner)
    for path in paths:
        kernel = get_path(plain, path + ("kernel",))
        if is_quantized(kernel):
            continue
        stack = stack_of(path)
        in_axes = input_axes(path, tuple(np.shape(kernel)), stack, rules(kernel_in_axes), layer_names, owner)
        q = quantize_kernel(kernel, method, block_size, path_str(path), sum(n for _, n in stack), in_axes)
        box = get_path(out, path + ("kernel",))
        set_path(out, path + ("kernel",), box.replace_boxed(q) if isinstance(box, nn.meta.AxisMetadata) else q)
    return out


def dequantize_params(params) -> dict:
    """The full-precision tree the quantized one stands for (the reference in tests)."""
    return jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, params, is_leaf=is_quantized)


def quantized_paths(params) -> frozenset:
    """Module paths whose `kernel` is quantized."""
    return frozenset(path[:-1] for path, leaf in flatten(params).items() if is_quantized(leaf))


def has_quantized(params) -> bool:
    return any(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized))


def param_bytes(params) -> dict:
    """Bytes and parameter counts of a (possibly abstract, e.g. `jax.eval_shape`) tree: the
    quantized kernels, everything, and bytes per parameter of each."""
    q_bytes = q_params = all_bytes = all_params = 0
    for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
        if is_quantized(leaf):
            q_bytes, q_params = q_bytes + leaf.nbytes, q_params + leaf.size
            all_bytes, all_params = all_bytes + leaf.nbytes, all_params + leaf.size
        else:
            n = int(np.prod(np.shape(leaf)))
            all_bytes, all_params = all_bytes + n * jnp.dtype(leaf.dtype).itemsize, all_params + n
    return {"quantized_bytes": q_bytes, "quantized_params": q_params,
            "quantized_bytes_per_param": q_bytes / q_params if q_params else None,
            "bytes": all_bytes, "params": all_params, "bytes_per_param": all_bytes / all_params if all_params else None}


def quantized_axes(params, param_axes) -> Any:
    """The logical-axis tree (`nn.get_partition_spec` of the unquantized model) for the quantized
    tree: a kernel's codes and block scales split like the kernel when one layer of it is 2-D (their
    axes are the kernel's with the input axis shortened); a stacked kernel's leading layer axes keep
    the kernel's names on every array (second-level scales too); N-D layers stay replicated."""
    out = flax.core.unfreeze(jax.tree.map(lambda x: x, param_axes, is_leaf=lambda x: isinstance(x, P)))
    for path in quantized_paths(params):
        kernel = get_path(params, path + ("kernel",))
        spec = get_path(param_axes, path + ("kernel",)) if param_axes is not None else None
        lead = kernel.ndim - len(kernel.layer_shape)
        if spec is None or len(spec) != kernel.ndim or len(kernel.layer_shape) != 2:
            spec = (None,) * kernel.ndim if lead else ()
        layers, spec = tuple(spec[:lead]), tuple(spec[lead:])
        if isinstance(kernel, NF4Kernel):
            axes = NF4Kernel(P(*layers, *spec), P(*layers, *spec), P(*layers), P(*layers), kernel.layer_shape,
                             kernel.dtype_name, kernel.block_size)
        elif isinstance(kernel, GGUFQ4Kernel):
            rows = P(*layers, *spec[1:], *spec[:1])  # (out, in) order
            axes = GGUFQ4Kernel(P(*rows, None), rows, None if kernel.minimum is None else rows, kernel.layer_shape,
                                kernel.dtype_name, kernel.method)
        else:
            axes = Int8Kernel(P(*layers, *spec), P(*layers, *spec[1:]), kernel.layer_shape, kernel.dtype_name)
        set_path(out, path + ("kernel",), axes)
    return out


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _frozen_kernel_call(apply):
    """`apply(kernel, rest, x)` on the dequantized kernel, differentiable in `rest` and `x` only.
    Optimization barriers tie each dequantization to the layer's input (forward) and to its output's
    cotangent (backward), so XLA cannot hoist them and no layer's full-precision kernel lives from
    one pass to the other. Measured on an H200 (8 Dense 4096x4096, 2,048 tokens, grad): the compiled
    temp of the NF4 step exceeds the float32 step's by one dequantized kernel (67 MB), while its
    arguments shrink from 570 to 103 MB. XLA:CPU's figures count every layer's temporary instead."""

    @jax.custom_vjp
    def call(kernel, rest, x):
        kernel, x = jax.lax.optimization_barrier((kernel, x))
        return apply(kernel.dequantize(), rest, x)

    def fwd(kernel, rest, x):
        return call(kernel, rest, x), (kernel, rest, x)

    def bwd(res, g):
        kernel, rest, x = res
        kernel, g = jax.lax.optimization_barrier((kernel, g))
        _, vjp = jax.vjp(lambda rest, x: apply(kernel.dequantize(), rest, x), rest, x)
        return (jax.tree.map(_zero_cotangent, kernel), *vjp(g))

    call.defvjp(fwd, bwd)
    return call


def _dequantizing_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or module.scope is None or not args
            or not module.has_variable("params", "kernel")
            or not is_quantized(module.get_variable("params", "kernel"))):
        return next_fun(*args, **kwargs)
    if len(args) > 1 or kwargs:
        raise TypeError(f"quant: module {path_str(module.scope.path)} is called with more than its input; "
                        "quantized kernels support Dense-like modules (one input argument)")
    rest = {k: v for k, v in module.variables["params"].items() if k != "kernel"}
    clone = module.clone(parent=None)

    def apply(kernel, rest, x):
        return clone.apply({"params": {**rest, "kernel": kernel}}, x)

    return _frozen_kernel_call(apply)(module.get_variable("params", "kernel"), rest, args[0])


@contextlib.contextmanager
def dequantized():
    """Inside this context, linen modules whose `kernel` param is quantized run on it dequantized
    (per call, rematerialized for the backward pass; see the module docstring)."""
    with nn.intercept_methods(_dequantizing_interceptor):
        yield


def maybe_dequantized(params):
    """`dequantized()` when `params` holds a quantized kernel, else a context that does nothing."""
    return dequantized() if has_quantized(params) else contextlib.nullcontext()
