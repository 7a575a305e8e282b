"""Which layers an adapter touches, found on the param tree alone.

A *module* is a dict in the params tree; a *linear module* is one holding a `kernel` leaf with
two or more axes (nn.Dense, nn.DenseGeneral, nnx.Linear). Its path is the tuple of dict keys
leading to it, kept as they are (nnx lists give integer keys) and written as their str()s
'/'-joined in patterns and files (`encoder/layer_0/attention/query`, `layers/0/q`).

Patterns follow `vera_jax.tree.matches` (PEFT's rule, on '/' instead of '.'): a name matches a
path equal to it or ending in '/' + it; any other pattern is a regex full-matched on the path.

Kernel rule: a kernel of shape (l_1..l_s, i_1..i_k, o_1..o_m) is s stacked layers (linen
`nn.scan` / nnx `vmap` over layers put a leading axis on every param of the scanned module), each
the linear map (prod i, prod o). k = 1 unless `kernel_in_axes` names the module (DenseGeneral
with `axis=(-2, -1)`, an attention output projection (heads, head_dim, embed), needs k = 2).
Flattening is C-order reshape, which is what DenseGeneral's contraction does.

Layer axes are known from flax partitioning metadata (`nn.Partitioned` / `LogicallyPartitioned`
names, e.g. `nn.scan(..., metadata_params={nn.PARTITION_NAME: "layers"})`: leading axes named in
`layer_axis_names`), or from the config's `stacked_axes` (pattern of the scanned module -> its
number of layer axes), which wins. The scanned module is where a layer's per-layer name gets its
index: layer i of `layers/attn/query` is `layers_i/attn/query`, the name its unrolled twin
(linen's `layers_0`, `layers_1`, ...) has, used by adapter files and `unstack`. A kernel whose axes
no rule explains (more than two without `kernel_in_axes`) is refused, never guessed. The rule
itself lives in `vera_jax.tree` (`layer_stacks`, `input_axes`), where `quant.quantize_params` reads
it too. `layers_to_transform` keeping some layers of a stack marks them in the spec's `keep`; the
others are masked on every path (`core.masked`, the factored hook) and left out of files and counts.
"""

from __future__ import annotations

import math
import warnings
from typing import Hashable, Iterable, Iterator, Mapping, NamedTuple

import numpy as np

from ..tree import DEFAULT_LAYER_AXIS_NAMES, axis_names, flatten, input_axes, layer_stacks, matches, path_str

__all__ = ["DEFAULT_LAYER_AXIS_NAMES", "LayerSpec", "axis_names", "find_extra", "find_targets", "layer_index",
           "linear_modules", "unrolled"]


class LayerSpec(NamedTuple):
    """One adapted linear layer: where it is, its kernel's shape, and its stacked layer axes.

    stack: ((position in `path` of a scanned module, its number of layer axes), ...), outermost
      first; () for an unstacked layer. The kernel's leading `stacked_axes` axes are layers.
    keep: which of a stacked kernel's layers are adapted (C order, `layers_to_transform` keeping
      some of them); () for all. The others hold adapter leaves too (the scan slices them), which
      are zero, masked to an exactly zero delta on every path and never saved or counted."""

    path: tuple[Hashable, ...]
    kernel_shape: tuple[int, ...]
    in_axes: int
    stack: tuple[tuple[int, int], ...] = ()
    keep: tuple[bool, ...] = ()

    @property
    def name(self) -> str:
        return path_str(self.path)

    @property
    def stacked_axes(self) -> int:
        return sum(n for _, n in self.stack)

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """The layer axes' sizes: () unstacked, (L,) for one nn.scan, (G, L) for a scan of scans."""
        return self.kernel_shape[: self.stacked_axes]

    @property
    def n_layers(self) -> int:
        return math.prod(self.layer_shape)

    @property
    def mask(self) -> np.ndarray | None:
        """The adapted layers as a bool array of `layer_shape`, or None when all are (see `keep`)."""
        if not self.keep or all(self.keep):
            return None
        return np.array(self.keep, bool).reshape(self.layer_shape)

    @property
    def in_features(self) -> int:
        s = self.stacked_axes
        return math.prod(self.kernel_shape[s: s + self.in_axes])

    @property
    def out_features(self) -> int:
        return math.prod(self.kernel_shape[self.stacked_axes + self.in_axes:])

    @property
    def per_layer(self) -> "LayerSpec":
        """This spec for one layer's slice (same path, no layer axes): what the methods see."""
        return LayerSpec(self.path, self.kernel_shape[self.stacked_axes:], self.in_axes)

    def layer_path(self, index: tuple[int, ...]) -> tuple[Hashable, ...]:
        """The unrolled twin's path of layer `index`: each scanned module's name gets `_<i>` (an
        index of the outer layer axes only renames the outer scanned modules)."""
        path, rest = list(self.path), list(index)
        for pos, n in self.stack:
            if len(rest) < n:
                break
            path[pos] = "_".join([str(path[pos])] + [str(i) for i in rest[:n]])
            rest = rest[n:]
        return tuple(path)

    def layers(self) -> Iterator[tuple[tuple[int, ...], "LayerSpec"]]:
        """(index, the unrolled twin's LayerSpec) of each adapted layer (all, or those `keep` marks),
        in C order; one ((), self) unstacked."""
        for k, index in enumerate(np.ndindex(*self.layer_shape)):
            if not self.keep or self.keep[k]:
                yield index, LayerSpec(self.layer_path(index), self.kernel_shape[self.stacked_axes:], self.in_axes)


def unrolled(layers: Iterable[LayerSpec]) -> tuple[tuple[LayerSpec, LayerSpec, tuple[int, ...]], ...]:
    """(stacked spec, per-layer spec, index) for every layer, in the unrolled twin's tree order:
    `layers_0/query, layers_0/value, layers_1/query, ...` for a scan over blocks of (query, value)."""
    layers = tuple(layers)
    rank: dict = {}
    for spec in layers:
        for t in range(1, len(spec.path) + 1):
            rank.setdefault(spec.path[:t], len(rank))
    items = []
    for spec in layers:
        points = dict(spec.stack)
        for index, one in spec.layers():
            key, rest = [], list(index)
            for t in range(len(spec.path)):
                n = points.get(t, 0)
                key.append((rank[spec.path[: t + 1]], tuple(rest[:n])))
                rest = rest[n:]
            items.append((tuple(key), (spec, one, index)))
    return tuple(item for _, item in sorted(items, key=lambda kv: kv[0]))


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


def _kept(spec: LayerSpec, config) -> LayerSpec | None:
    """layers_to_transform on a layer: the spec, None when it is left out; a stacked kernel with only
    some of its layers kept gets `keep` (the others masked, see LayerSpec)."""
    keep = config.layers_to_transform
    picked = tuple(layer_index(one.path, config.layers_pattern) in keep for _, one in spec.layers())
    if not any(picked):
        return None
    return spec if all(picked) else spec._replace(keep=picked)


def find_targets(params: Mapping, config, names: Mapping[tuple, tuple] | None = None) -> tuple[LayerSpec, ...]:
    """The linear modules `config.targets` selects, as LayerSpecs; ValueError if none, or for a
    kernel whose axes no rule explains. `names`: leaf path -> axis names from partitioning
    metadata (`axis_names` of the boxed params), which says where layer axes are. A config
    without `layers_to_transform` / `kernel_in_axes` / `stacked_axes` (a registered method's own)
    adapts every layer, with one input axis per kernel."""
    cls = type(config).__name__
    modules = linear_modules(params)
    in_axes_rules = getattr(config, "kernel_in_axes", ())
    layer_names = tuple(getattr(config, "layer_axis_names", DEFAULT_LAYER_AXIS_NAMES))
    stack_of = layer_stacks(names, getattr(config, "stacked_axes", ()), layer_names, cls)
    layers_to_transform = getattr(config, "layers_to_transform", None)
    specs = []
    for path, shape in modules.items():
        if not any(matches(t, path_str(path)) for t in config.targets):
            continue
        stack = stack_of(path)
        in_axes = input_axes(path, shape, stack, in_axes_rules, layer_names, cls)
        spec = LayerSpec(path, shape, in_axes, stack)
        if layers_to_transform is not None:
            spec = _kept(spec, config)
            if spec is None:
                continue
        specs.append(spec)
    if not specs:
        where = "" if layers_to_transform is None else f" in layers {list(layers_to_transform)}"
        raise ValueError(
            f"{cls}.targets: {list(config.targets)} matched no linear module{where}. "
            f"Linear modules in these params: {abbreviate(path_str(p) for p in modules) or 'none'}"
        )
    unmatched = [t for t in config.targets if not any(matches(t, path_str(p)) for p in modules)]
    if unmatched:  # e.g. HF's "attention/output/dense" where our models say "attn_out": silently fewer layers
        warnings.warn(f"{cls}.targets: {unmatched} matched no linear module (the other patterns did). Linear "
                      f"modules in these params: {abbreviate(path_str(p) for p in modules)}", stacklevel=3)
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
