"""Building blocks and checkpoint plumbing shared by the model families.

Layers wrap every initializer in `nn.with_logical_partitioning` so a trainer can shard
by rules. Logical axis names used here: "vocab", "embed", "heads" (the joined
heads*head_dim dimension of attention projections), "mlp", "patch" (flattened image
patch); `None` marks small dimensions that stay replicated (positions, token types,
labels, the square dense layers of classification heads).

Checkpoint conversion is declared once per family as a list of `Entry`s (one HF tensor
<-> one leaf of our param tree); `params_from_entries` and `params_to_entries` run it
in both directions and report every missing, unexpected and misshapen tensor at once.

Scanned layers (`scan_layers=True` in every family): the blocks run under one `nn.scan`
(`scan_blocks`), so compile time does not grow with depth; their params are one subtree `layer`
whose leaves carry a leading layer axis, named "layers" in the partitioning metadata (what the
adapters read to adapt each layer as its unrolled twin, whose layers `layer_{i}` are exactly the
unrolled model's, so adapter files serve both layouts). Checkpoints keep HF's per-layer tensors:
`stack_layers` / `unstack_layers` convert between the unrolled `layer_{i}` trees and the stack.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vera_jax.tree import flatten, get_path, set_path, unflatten

Dtype = Any
LAYERS = "layers"  # the logical (partitioning) name of the scanned params' leading axis
SCANNED = "layer"  # the scanned blocks' subtree: its unrolled twin's layers are `layer_{i}`, as unrolled models
LAYER_CACHE = object()  # `scan_blocks` argument standing for each layer's view of the stacked KV cache
_LAYER = re.compile(r"^layer_(\d+)$")

ACTIVATIONS: dict[str, Callable] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


def activation(name: str) -> Callable:
    """HF `hidden_act` name -> function (exact erf GELU for "gelu", as PyTorch)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def num_labels(hf_config: dict) -> int:
    """Label count the way `transformers.PretrainedConfig` derives it (default 2)."""
    if "num_labels" in hf_config:
        return int(hf_config["num_labels"])
    if hf_config.get("id2label"):
        return len(hf_config["id2label"])
    return 2


def architecture(hf_config: dict, default: str, known: tuple[str, ...]) -> str:
    """The HF class a config describes (`architectures[0]`, else `default`), checked against the
    classes a family builds."""
    arch = (hf_config.get("architectures") or [default])[0]
    if arch not in known:
        raise ValueError(f"architecture {arch!r} is not supported; known: {known}")
    return arch


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    init_std: float,
    use_bias: bool = True,
) -> nn.Dense:
    """Plain 2-D `nn.Dense` (kernel (in, out)) with logical axes on kernel and bias."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def layer_norm(eps: float, *, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def embed(
    num: int,
    features: int,
    axes: tuple[str | None, str | None],
    *,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    init_std: float,
) -> nn.Embed:
    return nn.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), axes),
        name=name,
    )


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention: `query`/`key`/`value` Dense, then `attn_out`.

    `mask` is (batch, kv_len) with 1 for tokens to attend to. Softmax runs in float32.
    """

    num_heads: int
    dropout_rate: float
    init_std: float
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        features = x.shape[-1]
        if features % self.num_heads:
            raise ValueError(f"hidden size {features} is not divisible by num_heads {self.num_heads}")
        head_dim = features // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std)

        def heads(name):
            y = dense(features, ("embed", "heads"), name=name, use_bias=self.use_bias, **kw)(x)
            return y.reshape(*x.shape[:-1], self.num_heads, head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(head_dim)
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :].astype(bool), logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape[:-1] + (features,))
        return dense(features, ("heads", "embed"), name="attn_out", use_bias=self.use_bias, **kw)(out)


def scan_blocks(block: nn.Module, num_layers: int, x, *args, cache: dict | None = None):
    """`x = block(x, *args)` for `num_layers` layers under one `nn.scan`: `block` (unbound, named
    `SCANNED`, `nn.remat`-wrapped where the unrolled path is) gets params stacked on a leading axis
    whose partitioning name is "layers", and its own dropout key per layer.

    A block may return (x, layer cache); without `cache` the second part is dropped and `x` is
    returned. With `cache` (a stacked KV cache {"key", "value"}, see `decoding.init_cache`), the
    argument `LAYER_CACHE` in `args` becomes each layer's view of it (the stack plus its "layer"
    index, see `decoding.write_cache`), the cache is carried from layer to layer, and (x, cache)
    is returned.
    """

    def body(module, carry, layer):
        if cache is None:
            out = module(carry, *args)
            return (out[0] if isinstance(out, tuple) else out), None
        h, stack = carry
        view = {**stack, "layer": layer}
        h, view = module(h, *(view if a is LAYER_CACHE else a for a in args))
        return (h, {"key": view["key"], "value": view["value"]}), None

    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   length=num_layers, metadata_params={nn.PARTITION_NAME: LAYERS})
    out, _ = scan(block, x if cache is None else (x, cache), jnp.arange(num_layers, dtype=jnp.int32))
    return out


def stack_layers(params: dict) -> dict:
    """Unrolled params (top-level `layer_0` ... `layer_{L-1}`) -> scanned params (one `layer`
    subtree, each array stacked on a leading axis); other subtrees unchanged. Quantized kernels
    are refused: quantize the scanned tree instead."""
    index = {int(m.group(1)): k for k in params if (m := _LAYER.match(str(k)))}
    if not index or sorted(index) != list(range(len(index))):
        raise ValueError(f"stack_layers: expected top-level layer_0 ... layer_N, got {sorted(index.values())}")
    layers = [params[index[i]] for i in range(len(index))]
    for path, leaf in flatten(layers[0]).items():
        if not isinstance(leaf, (np.ndarray, jax.Array)):
            raise ValueError(f"stack_layers: layer_0/{'/'.join(map(str, path))} is a {type(leaf).__name__}, not an "
                             "array; stack the float params, then quantize the stacked tree")
    rest = {k: v for k, v in params.items() if k not in index.values()}
    stack = np.stack if all(isinstance(v, np.ndarray) for v in jax.tree.leaves(layers)) else jnp.stack
    return {**rest, SCANNED: jax.tree.map(lambda *xs: stack(xs), *layers)}


def boxed(params: dict, axes) -> dict:
    """`params` with each leaf boxed in its logical axis names (`nn.LogicallyPartitioned`; `axes`
    as `nn.get_partition_spec` gives them), so the adapters read a scanned model's layer axis
    ("layers") from the metadata as they would from `model.init`'s params."""
    return jax.tree.map(lambda x, spec: nn.LogicallyPartitioned(x, tuple(spec)), params, axes)


def unstack_layers(params: dict) -> dict:
    """Inverse of `stack_layers`: a scanned tree's `layer` subtree -> `layer_{i}` subtrees
    (params without `layer` are returned as they are)."""
    if SCANNED not in params:
        return params
    stack = params[SCANNED]
    count = {np.shape(v)[0] for v in jax.tree.leaves(stack)}
    if len(count) != 1:
        raise ValueError(f"unstack_layers: the leaves of {SCANNED!r} disagree on the layer count: {sorted(count)}")
    (n,) = count
    rest = {k: v for k, v in params.items() if k != SCANNED}
    return {**rest, **{f"layer_{i}": jax.tree.map(lambda v, i=i: v[i], stack) for i in range(n)}}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor <-> one leaf. `kind` names the layout change (see TRANSFORMS)."""

    path: tuple[str, ...]
    hf: str
    kind: str = "copy"


def _conv_patches(x, shape):
    # torch Conv2d weight (out, C, P, P) -> Dense over flattened (P, P, C) patches
    return np.transpose(x, (2, 3, 1, 0)).reshape(-1, x.shape[0])


def _patches_conv(x, shape):
    p, c = shape
    return np.transpose(x.reshape(p, p, c, -1), (3, 2, 0, 1))


# kind -> (hf -> ours, ours -> hf); the second argument is extra shape info where needed.
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda x, s: x, lambda x, s: x),
    "linear": (lambda x, s: np.transpose(x), lambda x, s: np.transpose(x)),
    "conv_patches": (_conv_patches, _patches_conv),
}


def linear(path: tuple[str, ...], hf_module: str, bias: bool = True) -> list[Entry]:
    """Entries for a torch `nn.Linear` (weight (out, in)) stored as our Dense (in, out)."""
    out = [Entry(path + ("kernel",), f"{hf_module}.weight", "linear")]
    if bias:
        out.append(Entry(path + ("bias",), f"{hf_module}.bias"))
    return out


def norm(path: tuple[str, ...], hf_module: str) -> list[Entry]:
    return [Entry(path + ("scale",), f"{hf_module}.weight"), Entry(path + ("bias",), f"{hf_module}.bias")]


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message names every offending tensor."""


def abstract_params(module: nn.Module, inputs: Sequence[Any]) -> dict:
    """Unboxed param tree of ShapeDtypeStructs, without allocating anything."""
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
    return nn.unbox(variables)["params"]


def init_subtrees(module: nn.Module, inputs: Sequence[Any], names: Iterable[str], seed: int) -> dict:
    """Fresh top-level subtrees `names` exactly as `module.init(jax.random.key(seed))` makes them.

    Jitted so XLA prunes everything except the requested subtrees (cheap for big encoders).
    """
    names = tuple(names)

    @jax.jit
    def init(key):
        params = nn.unbox(module.init(key, *inputs))["params"]
        return {n: params[n] for n in names}

    return jax.tree.map(np.asarray, init(jax.random.key(seed)))


def params_from_entries(
    tensors: dict[str, np.ndarray],
    entries: Sequence[Entry],
    shapes: dict,
    *,
    ignore: Sequence[str] = (),
    fresh: dict[str, Callable[[], dict]] | None = None,
    shape_info: dict[str, Any] | None = None,
    finish: Callable[[tuple, np.ndarray], Any] | None = None,
) -> dict:
    """Build our param tree from HF tensors.

    `shapes` is the model's abstract param tree; every leaf must be covered by `entries`.
    `ignore`: regexes (re.search) for checkpoint tensors the model does not use.
    `fresh`: top-level subtree name -> initialiser, used only when the checkpoint holds
    none of that subtree's tensors (a base checkpoint loaded under a new head); a subtree
    that is partly present is an error like any other missing tensor.
    `finish(path, value)`: what each converted leaf (fresh ones too) becomes, called before the
    next tensor is read, e.g. cast, quantized and placed on devices; with `tensors` that read
    themselves when converted (`hub.stored_tensors`) the host then holds one float tensor at a
    time instead of the whole model (`hub.from_pretrained(quantize=...)`).
    """
    fresh = fresh or {}
    shape_info = shape_info or {}
    flat_shapes = {k: v.shape for k, v in flatten(shapes).items()}
    covered = {e.path for e in entries}
    if covered != set(flat_shapes):
        raise AssertionError(
            f"conversion table out of sync with the model: unmapped {sorted(set(flat_shapes) - covered)}, "
            f"unknown {sorted(covered - set(flat_shapes))}"
        )
    fresh_groups = {g for g in fresh if all(e.hf not in tensors for e in entries if e.path[0] == g)}
    params: dict = {}
    missing, misshapen, used = [], [], set()
    for e in entries:
        if e.path[0] in fresh_groups:
            continue
        if e.hf not in tensors:
            missing.append(e.hf)
            continue
        used.add(e.hf)
        value = TRANSFORMS[e.kind][0](np.asarray(tensors[e.hf]), shape_info.get(e.kind))
        want = tuple(flat_shapes[e.path])
        if value.shape != want:
            misshapen.append(f"{e.hf}: checkpoint {tuple(tensors[e.hf].shape)}, model expects {want} "
                             f"after {e.kind!r} layout change ({'/'.join(e.path)})")
            continue
        set_path(params, e.path, value if finish is None else finish(e.path, value))
        del value  # so a streamed load's previous tensor is freed before the next is read
    unexpected = sorted(k for k in tensors if k not in used and not any(re.search(p, k) for p in ignore))
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"missing tensors: {missing}")
        if unexpected:
            parts.append(f"unexpected tensors: {unexpected}")
        if misshapen:
            parts.append("misshapen tensors: " + "; ".join(misshapen))
        raise CheckpointError("checkpoint does not match the model: " + " | ".join(parts))
    for g in sorted(fresh_groups):
        params[g] = fresh[g]()
        if finish is not None:
            params[g] = unflatten({p: finish((g,) + p, v) for p, v in flatten(params[g]).items()})
    return params


def params_to_entries(params: dict, entries: Sequence[Entry], shape_info: dict[str, Any] | None = None) -> dict:
    """Inverse of `params_from_entries`: our param tree (unrolled or scanned) -> {HF name: np.ndarray}."""
    shape_info = shape_info or {}
    params = unstack_layers(params)
    return {
        e.hf: np.ascontiguousarray(TRANSFORMS[e.kind][1](np.asarray(get_path(params, e.path)), shape_info.get(e.kind)))
        for e in entries
    }


def strip_prefix(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Drop HF's base-model prefix ("roberta.", "bert.", "vit.") and rename legacy
    LayerNorm gamma/beta, so task and base checkpoints share one naming."""
    out = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            k = k[len(prefix):]
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        out[k] = v
    return out
