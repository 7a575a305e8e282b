"""Adapter files: a directory with `adapter_config.json` and `adapter_model.safetensors`.

The tensors file holds only trained leaves: `adapter/<module path>/<leaf>`, the method's adapter
leaves by their names (`lambda_d|lambda_b` for VeRA, `lora_A|lora_B` for LoRA, plus `magnitude`
for DVoRA; a leaf the method labels frozen, e.g. d with train_d=False, is rebuilt, not stored),
`head/<leaf path>` for `trainable_extra` leaves, `base/<leaf path>` for the rest of a fully
fine-tuned model, and `projections/...` only when `save_projection=True`. The JSON holds the
method's name (its registry entry rebuilds the adapter on load), the config, the adapted layers
and their kernel shapes, the projections' fingerprint (for a method that draws projections), the tensors
file's SHA-256 and the JAX version that wrote it. Never pickle.

Loading rebuilds A and B from the seed and refuses a fingerprint mismatch; any problem (missing
or corrupt file, layers or shapes that do not fit the given params, missing or unexpected
tensors) raises `AdapterFileError` before anything is returned.

Tensor names join the path keys' str() with '/'; loading maps each name back through the keys
of the params it is loaded onto, so non-string keys (nnx lists' integers) round-trip.

Stacked (scanned) layers are written per layer, under their unrolled twin's names
(`adapter/layers_2/query/lambda_d` for layer 2 of `layers/query`; layer records and the
projections' fingerprint likewise), so a file saved from a scanned model loads onto its unrolled
twin and the other way round, and PEFT export and serving see ordinary layers.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..tree import flat_names, flatten, get_path, path_str, set_path
from . import core
from . import directory as adapter_dir
from .core import Adapted
from .methods import registry
from .projections import PRNG_IMPL, fingerprint
from .split import HEAD, optax_labels, partition

FORMAT = "vera_jax.adapter"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupt, or does not fit the params it is loaded onto."""


def _to_numpy(x) -> tuple[np.ndarray, str]:
    """safetensors.numpy cannot store bfloat16 and friends: those travel as float32 (exact)."""
    arr = np.asarray(jax.device_get(x))
    dtype = str(arr.dtype)
    if arr.dtype.kind == "V" or dtype in ("bfloat16",) or dtype.startswith("float8"):
        arr = arr.astype(np.float32)
    return np.ascontiguousarray(arr), dtype


def _trained_leaves(adapted: Adapted) -> dict[str, tuple[str, tuple, object]]:
    """Tensor name -> (tree, path, value) for every trained leaf: `adapter/...` for adapter
    vectors, `head/...` for trainable_extra leaves, `base/...` for the rest of a fully
    fine-tuned model. Frozen leaves (e.g. d with train_d=False) are rebuilt, not stored."""
    trainable, _ = partition(adapted)
    labels = optax_labels(adapted)
    out = {}
    for tree in ("adapter", "base"):
        for path, value in flatten(getattr(trainable, tree)).items():
            if not jax.tree.leaves(value):  # frozen: None, or a quantized kernel's emptied node
                continue
            prefix = tree if tree == "adapter" else ("head" if get_path(labels.base, path) == HEAD else "base")
            out[path_str((prefix,) + path)] = (tree, path, value)
    return out


def _layer_records(adapted: Adapted) -> list[dict]:
    return [{"path": s.name, "kernel_shape": list(s.kernel_shape), "in_axes": s.in_axes} for s in adapted.layers]


def save_adapter(path: str | os.PathLike, adapted: Adapted) -> Path:
    """Writes the trained leaves of `adapted` to the directory `path`, atomically (a failure
    leaves no partial adapter; see `directory.write`). Returns the directory."""
    if not isinstance(adapted, Adapted):
        raise TypeError(f"save_adapter: expected an Adapted tree, got {type(adapted).__name__}")
    adapted = core.per_layer_view(adapted)
    tensors, dtypes = {}, {}
    for name, (_, _, value) in _trained_leaves(adapted).items():
        tensors[name], dtypes[name] = _to_numpy(value)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": adapted.method,
        "config": adapted.config.to_dict(),
        "layers": _layer_records(adapted),
        "head": [path_str(p) for p in adapted.extra],
        "dtypes": dtypes,
        "jax_version": jax.__version__,
    }
    if adapted.projections:
        record["projections"] = {
            "prng_impl": PRNG_IMPL,
            "threefry_partitionable": True,
            "shapes": {k: list(v.shape) for k, v in flat_names(adapted.projections).items()},
            "fingerprint": fingerprint(adapted.projections),
        }
        if _saves_projection(adapted.config):
            for k, v in flat_names(adapted.projections).items():
                tensors[f"projections/{k}"], dtypes[f"projections/{k}"] = _to_numpy(v)
    return adapter_dir.write(Path(path), tensors,
                             lambda written: {**record, "tensors_sha256": adapter_dir.sha256(written)},
                             metadata={"format": FORMAT})


def _read_record(directory: Path) -> dict:
    record = adapter_dir.read_config(directory, AdapterFileError, "adapter")
    config_path = directory / adapter_dir.CONFIG_FILE
    if record.get("format") != FORMAT:
        raise AdapterFileError(f"{config_path} is not a vera_jax adapter (format != {FORMAT!r})")
    if record.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"{config_path}: format_version {record.get('format_version')!r}, this library reads {FORMAT_VERSION}")
    if record.get("method") not in registry.names():
        raise AdapterFileError(f"{config_path}: unknown method {record.get('method')!r}; known: {registry.names()} "
                               "(register a method with vera_jax.register_method before loading its adapters)")
    return record


def _saves_projection(config) -> bool:
    """Whether A/B are stored (`save_projection`, for configs that have the field)."""
    return bool(getattr(config, "save_projection", False))


def load_adapter(path: str | os.PathLike, params, stacked_axes=None) -> Adapted:
    """Rebuilds the `Adapted` tree saved at `path` on top of `params` (the same base model, scanned
    or unrolled whichever way the file was saved). `stacked_axes` replaces the saved config's
    field (e.g. a file saved from an unrolled model, loaded onto a scanned one without metadata)."""
    directory = Path(path)
    record = _read_record(directory)
    method = record["method"]
    try:
        config = registry.get(method).config_class.from_dict(record["config"])
        if stacked_axes is not None:
            config = config.replace(stacked_axes=stacked_axes)
        stacked = core.attach(params, config)
    except (ValueError, TypeError, KeyError) as e:
        raise AdapterFileError(f"adapter at {directory} does not fit these params: {e}") from None
    fresh = core.per_layer_view(stacked)

    saved_layers = record.get("layers", [])
    by_path = lambda records: sorted(records, key=lambda r: r["path"])  # noqa: E731 (the layouts order layers apart)
    if by_path(saved_layers) != by_path(_layer_records(fresh)):
        saved = {r["path"]: r["kernel_shape"] for r in saved_layers}
        found = {s.name: list(s.kernel_shape) for s in fresh.layers}
        diffs = [f"{p}: adapter {saved.get(p, 'absent')}, params {found.get(p, 'absent')}"
                 for p in sorted(set(saved) | set(found)) if saved.get(p) != found.get(p)]
        raise AdapterFileError(
            f"adapter at {directory} was trained on other layers or shapes: {'; '.join(diffs) or saved_layers}")
    head = [path_str(p) for p in fresh.extra]
    if record.get("head", []) != head:
        raise AdapterFileError(
            f"adapter at {directory}: head leaves {record.get('head')} do not match the params' {head}")

    tensors = adapter_dir.read_tensors(directory, AdapterFileError, "adapter",
                                       expected_sha256=record.get("tensors_sha256", ""))
    projections = fresh.projections
    stored_projections = set()
    if fresh.projections:
        if _saves_projection(config):
            stored_projections = {f"projections/{k}" for k in flat_names(fresh.projections)}
            missing = sorted(stored_projections - set(tensors))
            if missing:
                raise AdapterFileError(
                    f"adapter at {directory}: save_projection=True but tensors {missing} are missing")
            projections = jax.tree_util.tree_map_with_path(
                lambda p, _: jnp.asarray(tensors["projections/" + path_str(tuple(k.key for k in p))]),
                fresh.projections)
        if fingerprint(projections) != record["projections"]["fingerprint"]:
            source = "stored A/B" if _saves_projection(config) else (
                f"A/B rebuilt from seed {config.seed} with jax {jax.__version__} (file written with jax "
                f"{record.get('jax_version')}; a JAX upgrade may change random streams: "
                "save with save_projection=True)")
            raise AdapterFileError(f"adapter at {directory}: projection fingerprint mismatch for the {source}")

    expected = _trained_leaves(fresh)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - stored_projections)
    if missing or unexpected:
        raise AdapterFileError(f"adapter at {directory}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, (_, _, ref) in expected.items():
        if tuple(tensors[name].shape) != tuple(np.shape(ref)):
            raise AdapterFileError(
                f"adapter at {directory}: tensor {name} has shape {tensors[name].shape}, expected {np.shape(ref)}")

    dtypes = record.get("dtypes", {})
    trees = {"adapter": jax.tree.map(lambda x: x, fresh.adapter), "base": jax.tree.map(lambda x: x, fresh.base)}
    for name, (tree, path, _) in expected.items():
        set_path(trees[tree], path, jnp.asarray(tensors[name], dtype=dtypes.get(name, tensors[name].dtype)))
    return stacked.replace(base=trees["base"], adapter=core.restack(trees["adapter"], stacked.layers),
                           projections=core.restack(projections, stacked.layers))
