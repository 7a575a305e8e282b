"""Hugging Face PEFT adapter directories (VeRA and LoRA), read and written exactly.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors` whose keys
are the PyTorch module names of the base model under `base_model.model.`:

    VeRA  <module>.vera_lambda_d (r,), <module>.vera_lambda_b (out,),
          base_model.vera_A (r, in_max), base_model.vera_B (out_max, r)   (save_projection=true)
    LoRA  <module>.lora_A.weight (r, in), <module>.lora_B.weight (out, r), scaling lora_alpha / r
    both  <module>.<param> for every parameter of a `modules_to_save` module (a trained head)

These are our `Adapted` leaves under other names: the same d, b, A, B, lora_A, lora_B (VeRA's A
and B are shared and sliced A[:, :in], B[:out, :] per layer, as here); only head weights change
layout (torch Linear weights are our kernels transposed). Module names are mapped through the
model family's `params_to_hf` (see `layout.py`): written adapters use the module names of the
installed transformers' PyTorch model (transformers 5 renamed some, e.g. ViT's), read adapters may
use those or the checkpoint's (older adapters). Every family that can export a checkpoint can
exchange adapters this way, with one exception: GPT-2's fused `c_attn` (query, key and value in one
Conv1D) is three Dense layers here, and a PEFT adapter on it has no exact equivalent (VeRA: one b
over the 3*d outputs and one d shared by the three; LoRA: one rank-r A shared by the three), so
either direction refuses it. GPT-2's other Conv1D layers (`attn.c_proj`, `mlp.c_fc`,
`mlp.c_proj`) are exchanged with `fan_in_fan_out: true`.

Only JSON and safetensors are read; a pickled `adapter_model.bin` is refused. An adapter saved
with `save_projection: false` holds no A/B: PEFT redraws them with torch's generator, which JAX
cannot reproduce, so loading needs the caller's `projections`. Features with no counterpart
here (DoRA, trained biases, per-module ranks, initialisations that rewrite the base weights,
...) are refused with the field that asks for them.

One module of ~500 lines on purpose: the reader and the writer share the format's rules (which
names map where, which features are refused and why); split apart, each rule would be stated twice.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vera_jax.adapters import core
from vera_jax.adapters import directory as adapter_dir
from vera_jax.adapters import targets as targets_lib
from vera_jax.adapters.core import Adapted
from vera_jax.adapters.directory import CONFIG_FILE, TENSORS_FILE
from vera_jax.adapters.files import AdapterFileError
from vera_jax.adapters.methods import registry
from vera_jax.interop.convert import to_lora
from vera_jax.interop.layout import (
    COPY,
    FUSED,
    TRANSPOSE,
    HFLayout,
    from_hf,
    hf_layout,
    module_names,
    read_hf_config,
    to_hf,
)
from vera_jax.tree import flatten

PREFIX = "base_model.model."
VERA_A, VERA_B = "base_model.vera_A", "base_model.vera_B"


def _mapping(config: dict) -> registry.PeftMapping:
    """The registered method's PEFT mapping for this adapter's (checked) peft_type."""
    return registry.by_peft_type(config["peft_type"]).peft


def _suffixes(config: dict) -> tuple[str, ...]:
    return tuple(_mapping(config).tensors.values())


class PeftFormatError(AdapterFileError):
    """A PEFT adapter directory is malformed, or asks for something vera_jax cannot represent."""


# ----------------------------------------------------------------------------------------- reading


def _read_config(directory: Path) -> dict:
    config = adapter_dir.read_config(directory, PeftFormatError, "PEFT adapter")
    peft_type = config.get("peft_type")
    if registry.by_peft_type(peft_type) is None:
        supported = sorted(m.peft.peft_type for m in map(registry.get, registry.names()) if m.peft is not None)
        raise PeftFormatError(f"{directory / CONFIG_FILE}: peft_type {peft_type!r} is not supported; "
                              f"supported: {supported}")
    return config


def _refuse(where: str, config: dict, field: str, allowed: tuple, why: str) -> None:
    """Raises unless `field` is absent, empty or one of `allowed`."""
    value = config.get(field)
    if value in (None, [], {}) or value in allowed:
        return
    raise PeftFormatError(f"{where}: {field}={value!r} is not supported: {why}")


def _check_features(where: str, config: dict) -> None:
    """Refuses PEFT options whose adapters are not plain VeRA / LoRA on linear layers (the
    method's own refusals come from its registry `PeftMapping`)."""
    _refuse(where, config, "bias", ("none",), "it trains the base layers' biases, which vera_jax adapters do not")
    _refuse(where, config, "target_parameters", (), "adapters on raw parameters are not supported")
    _refuse(where, config, "trainable_token_indices", (), "trainable token embeddings are not supported")
    _refuse(where, config, "layer_replication", (), "it duplicates layers of the base model")
    for field, allowed, why in _mapping(config).refusals:
        _refuse(where, config, field, allowed, why)


def _peft_matches(config: dict, key: str) -> bool:
    """PEFT's `check_target_module_exists` on a module name (peft 0.21)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, key):
            return False
        if not isinstance(exclude, str) and (key in exclude or any(key.endswith("." + e) for e in exclude)):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.get("modules_to_save") or ()):
        return False
    target = config.get("target_modules")
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    if key in target:
        return True
    if not any(key.endswith("." + t) for t in target):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _owners(name: str) -> list[str]:
    """The modules holding tensor `name`, outermost first."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def _split(where: str, config: dict, tensors: dict):
    """(adapter tensors per HF module, head tensors by HF name, VeRA projections); refuses
    tensors that are none of these."""
    suffixes = _suffixes(config)
    modules: dict[str, dict[str, np.ndarray]] = {}
    head, projections, unexpected = {}, {}, []
    to_save = config.get("modules_to_save") or []
    for key, value in tensors.items():
        if key in (VERA_A, VERA_B) and _mapping(config).shared_projections:
            projections[key] = value
            continue
        if not key.startswith(PREFIX):
            unexpected.append(key)
            continue
        name = key[len(PREFIX):]
        suffix = next((s for s in suffixes if name.endswith("." + s)), None)
        if suffix is not None:
            modules.setdefault(name[: -len(suffix) - 1], {})[suffix] = value
        elif any(o.endswith(m) for o in _owners(name) for m in to_save):
            head[name] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise PeftFormatError(f"{where}: unexpected tensors {sorted(unexpected)} (neither {' / '.join(suffixes)} "
                              f"of an adapted module nor a parameter of modules_to_save {to_save})")
    if not modules:
        raise PeftFormatError(f"{where}: no adapter tensors ({' / '.join(suffixes)}) in {TENSORS_FILE}")
    return modules, head, projections


def _linear_modules(layout: HFLayout) -> dict[str, list]:
    """HF module name -> [(our module path, Placement)] for every kernel (three for a fused one)."""
    out: dict[str, list] = {}
    for path, p in layout.leaves.items():
        if path[-1] == "kernel" and p.hf.endswith(".weight"):
            out.setdefault(p.hf[: -len(".weight")], []).append((path[:-1], p))
    return out


def _pick_layout(modules, head, layouts: list[HFLayout]) -> HFLayout:
    """The naming (PyTorch module names, else checkpoint names) the adapter's tensors use."""
    for layout in layouts:
        if set(modules) <= set(_linear_modules(layout)) and set(head) <= set(layout.tensors):
            return layout
    return layouts[0]


def _check_complete(where: str, config: dict, modules, head, projections, layout: HFLayout) -> None:
    """Every tensor PEFT would load is present: both vectors / matrices of each adapted module,
    each module target_modules selects, each parameter of modules_to_save, VeRA's A and B."""
    suffixes = _suffixes(config)
    missing = [f"{PREFIX}{m}.{s}" for m, found in modules.items() for s in suffixes if s not in found]
    if missing:
        raise PeftFormatError(f"{where}: missing tensors {sorted(missing)}")
    target = config.get("target_modules")
    if isinstance(target, list) or (isinstance(target, str) and target != "all-linear"):
        expected = {m for m in _linear_modules(layout) if _peft_matches(config, m)}
        missing += [f"{PREFIX}{m}.{s}" for m in sorted(expected - set(modules)) for s in suffixes]
        extra = sorted(set(modules) - expected)
        if extra:
            raise PeftFormatError(f"{where}: tensors for modules {extra}, which target_modules {target!r} does not "
                                  "select in this model")
    to_save = config.get("modules_to_save") or []
    saved = {t for t in layout.tensors if any(o.endswith(m) for o in _owners(t) for m in to_save)}
    missing += [PREFIX + t for t in sorted(saved - set(head))]
    if _mapping(config).shared_projections and config.get("save_projection", True):
        missing += [k for k in (VERA_A, VERA_B) if k not in projections]
    if missing:
        raise PeftFormatError(f"{where}: missing tensors {sorted(missing)}")


def _module_paths(where: str, modules, layout: HFLayout) -> dict[str, tuple[str, ...]]:
    """HF module name -> our module path, refusing fused and unknown modules."""
    by_hf = _linear_modules(layout)
    out = {}
    for name in sorted(modules):
        if name not in by_hf:
            known = sorted(by_hf)
            raise PeftFormatError(
                f"{where}: module {name} is not a linear layer of this {layout.model_type} model (the hf_config "
                f"must describe the architecture the adapter was trained on); linear modules: "
                f"{targets_lib.abbreviate(known)}")
        (path, p), *_ = by_hf[name]
        if p.layout == FUSED:
            parts = [s[-2] for s in p.shared_with]
            raise PeftFormatError(
                f"{where}: module {name} is the fused {'/'.join(parts)} projection of this {layout.model_type} model, "
                f"which vera_jax holds as separate Dense layers {parts}; a PEFT adapter on the fused layer has no "
                "exact equivalent on them (VeRA: one b over all outputs and one d shared by the parts; LoRA: one "
                "A shared by the parts). Merge it in PEFT (merge_and_unload) and load the merged checkpoint instead")
        if p.layout not in (COPY, TRANSPOSE):
            raise PeftFormatError(f"{where}: module {name} is not a torch Linear / Conv1D of a 2-D kernel here "
                                  f"({'/'.join(path)})")
        out[name] = path
    return out


def _head_leaves(where: str, head: dict, params, layout: HFLayout) -> dict[tuple[str, ...], np.ndarray]:
    out = {}
    for name, value in head.items():
        owners = layout.tensors.get(name)
        if owners is None:
            raise PeftFormatError(f"{where}: modules_to_save tensor {PREFIX}{name} is not a tensor of this "
                                  f"{layout.model_type} model")
        if len(owners) != 1:
            raise PeftFormatError(f"{where}: modules_to_save tensor {PREFIX}{name} is fused from {owners} here")
        path = owners[0]
        like = core.get_path(params, path)
        try:
            array = from_hf(value, layout.leaves[path], like, f"{where}: modules_to_save")
        except ValueError as e:
            raise PeftFormatError(str(e)) from None
        out[path] = np.asarray(array, dtype=like.dtype)
    return out


def _find_config(where: str, cls, params, paths: set, fields: dict):
    """Our config adapting exactly `paths`: by module names (and layer indices) when they select
    exactly those, else one regex of the full paths."""
    try:
        cls(**fields)
    except ValueError as e:
        raise PeftFormatError(f"{where}: {CONFIG_FILE} gives an invalid {cls.__name__}: {e}") from None
    names = tuple(sorted({p[-1] for p in paths}))
    layers = {targets_lib.layer_index(p, cls.layers_pattern) for p in paths}
    candidates = [dict(targets=names)]
    if None not in layers:
        candidates.append(dict(targets=names, layers_to_transform=tuple(sorted(layers))))
    for candidate in candidates:
        config = cls(**fields, **candidate)
        try:
            if {s.path for s in targets_lib.find_targets(params, config)} == paths:
                return config
        except ValueError:
            pass
    return cls(**fields, targets=("(?:" + "|".join(sorted("/".join(p) for p in paths)) + ")",))


def _find_extra(params, leaves: set) -> tuple[str, ...]:
    """trainable_extra patterns selecting exactly the head `leaves` (whole modules, as PEFT saves)."""
    if not leaves:
        return ()
    modules = set()
    for path in leaves:
        best = None
        for k in range(len(path) - 1, 0, -1):
            node = core.get_path(params, path[:k])
            if {path[:k] + p for p in flatten(node)} <= leaves:
                best = path[:k]
            else:
                break
        if best is None:
            raise PeftFormatError(f"modules_to_save: {'/'.join(path)} is imported but not the rest of its module")
        modules.add("/".join(best))
    names = tuple(sorted(modules))
    if set(targets_lib.find_extra(params, names)) == leaves:
        return names
    return ("(?:" + "|".join(names) + ")",)


def _check_shape(where: str, name: str, value: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != tuple(shape):
        raise PeftFormatError(f"{where}: tensor {name} has shape {tuple(value.shape)}, expected {tuple(shape)}")


def _projections(where: str, config: dict, stored: dict, given, r: int, in_max: int, out_max: int) -> dict:
    """PEFT's vera_A / vera_B (or the caller's), cut to the (r, in_max) / (out_max, r) we use."""
    if stored and given is not None:
        raise ValueError(f"{where}: the adapter stores vera_A/vera_B; do not pass projections")
    if not stored and given is None:
        raise PeftFormatError(
            f"{where}: save_projection=false, so the file holds no vera_A/vera_B. PEFT redraws them from "
            f"projection_prng_key={config.get('projection_prng_key', 0)} with PyTorch's generator, which JAX cannot "
            "reproduce. Pass projections={'A': vera_A, 'B': vera_B} (e.g. PeftModel.from_pretrained(...)"
            ".base_model.vera_A['default']), or re-save the adapter in PEFT with save_projection=True")
    if given is not None:
        if not isinstance(given, Mapping) or set(given) != {"A", "B"}:
            raise ValueError(f"{where}: projections must be a dict with keys 'A' and 'B'")
        a, b, name_a, name_b = np.asarray(given["A"]), np.asarray(given["B"]), "projections['A']", "projections['B']"
    else:
        a, b, name_a, name_b = stored[VERA_A], stored[VERA_B], VERA_A, VERA_B
    if a.ndim != 2 or a.shape[0] != r or a.shape[1] < in_max:
        raise PeftFormatError(f"{where}: {name_a} has shape {a.shape}, expected ({r}, >= {in_max})")
    if b.ndim != 2 or b.shape[1] != r or b.shape[0] < out_max:
        raise PeftFormatError(f"{where}: {name_b} has shape {b.shape}, expected (>= {out_max}, {r})")
    return {"A": jnp.asarray(a[:, :in_max], jnp.float32), "B": jnp.asarray(b[:out_max, :], jnp.float32)}


def load_peft_adapter(path: str | os.PathLike, params, hf_config, *, projections: Mapping | None = None) -> Adapted:
    """Reads a PEFT VeRA or LoRA adapter directory onto `params` (the same base model, in our
    layout) and returns the `Adapted` tree that computes what PEFT computes.

    `hf_config`: the base model's config.json (dict or path), naming the architecture the adapter
    was trained on (e.g. RobertaForSequenceClassification when it saves the classifier).
    `projections`: {"A", "B"} for a VeRA adapter saved with save_projection=false.
    The returned config has `save_projection=True` (A/B came from PyTorch and cannot be redrawn
    from a seed) and targets selecting exactly the adapted layers. Raises `PeftFormatError`
    naming the offending file, field or tensor.
    """
    directory = Path(path)
    where = f"PEFT adapter at {directory}"
    config = _read_config(directory)
    _check_features(where, config)
    tensors = adapter_dir.read_tensors(directory, PeftFormatError, "PEFT adapter")
    params = core._plain(params)
    hf_config = read_hf_config(hf_config)
    checkpoint = hf_layout(params, hf_config)
    renames = module_names(hf_config, checkpoint.tensors)
    modules, head, stored = _split(where, config, tensors)
    layout = _pick_layout(modules, head, [checkpoint.renamed(renames)] + ([checkpoint] if renames else []))
    paths = _module_paths(where, modules, layout)
    _check_complete(where, config, modules, head, stored, layout)
    kernels = targets_lib.linear_modules(params)
    specs = {p: targets_lib.LayerSpec(p, kernels[p], 1) for p in paths.values()}
    head_values = _head_leaves(where, head, params, layout)
    extra = _find_extra(params, set(head_values))
    mapping = _mapping(config)
    r = config.get("r", mapping.default_r)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise PeftFormatError(f"{where}: {CONFIG_FILE} field r={r!r} is not a positive integer")
    if projections is not None and not mapping.shared_projections:
        raise ValueError(f"{where}: projections are only used by VeRA adapters")

    adapter: dict = {}
    for name, module in paths.items():
        shapes, leaves = mapping.shapes(r, specs[module]), {}
        for leaf, suffix in mapping.tensors.items():
            value = modules[name][suffix]
            _check_shape(where, f"{PREFIX}{name}.{suffix}", value, shapes[leaf])
            leaves[leaf] = jnp.asarray(value, jnp.float32)
        core.set_path(adapter, module, leaves)
    method = registry.by_peft_type(config["peft_type"])
    ours = _find_config(where, method.config_class, params, set(paths.values()), mapping.from_peft(config, r, extra))
    fresh = core.attach(params, ours)
    if mapping.shared_projections:
        in_max = max(s.in_features for s in specs.values())
        out_max = max(s.out_features for s in specs.values())
        fresh = fresh.replace(projections=_projections(where, config, stored, projections, r, in_max, out_max))
    base = jax.tree.map(lambda x: x, fresh.base)
    for leaf_path, value in head_values.items():
        core.set_path(base, leaf_path, jnp.asarray(value))
    return fresh.replace(base=base, adapter=adapter)


# ----------------------------------------------------------------------------------------- writing


def _peft_methods() -> list[str]:
    return [n for n in registry.names() if registry.get(n).peft is not None]


def _module_name(adapted: Adapted, spec, layout: HFLayout) -> tuple[str, bool]:
    """(HF module name, is a Conv1D) for an adapted layer; refuses layers PEFT cannot hold."""
    placement = layout.leaves.get(spec.path + ("kernel",))
    if placement is None or not placement.hf.endswith(".weight"):
        raise ValueError(f"save_peft_adapter: adapted layer {spec.name} has no linear module in the HF "
                         f"{layout.model_type} checkpoint")
    if placement.layout == FUSED:
        parts = [s[-2] for s in placement.shared_with]
        raise ValueError(
            f"save_peft_adapter: adapted layer {spec.name} is part of HF's fused {placement.hf[:-len('.weight')]} "
            f"({'/'.join(parts)} in one Conv1D); PEFT can only adapt the fused layer as a whole, which cannot "
            f"express separate adapters on {parts}. Export a merged checkpoint (export_merged) instead, or adapt "
            "other layers")
    if placement.layout not in (COPY, TRANSPOSE) or len(spec.kernel_shape) != 2:
        raise ValueError(f"save_peft_adapter: adapted layer {spec.name} (kernel {spec.kernel_shape}) is not a "
                         f"torch Linear / Conv1D in HF ({placement.hf})")
    return placement.hf[: -len(".weight")], placement.layout == COPY


def _modules_to_save(adapted: Adapted, layout: HFLayout, adapted_modules: list[str]) -> tuple[list[str], dict]:
    """PEFT modules_to_save names covering exactly the trained head leaves, and their tensors."""
    tensors = {}
    for path in adapted.extra:
        placement = layout.leaves.get(path)
        if placement is None:
            raise ValueError(f"save_peft_adapter: head leaf {'/'.join(path)} has no tensor in the HF checkpoint")
        tensors[placement.hf] = to_hf(core.get_path(adapted.base, path), placement,
                                      f"save_peft_adapter: head leaf {'/'.join(path)}")
    modules = set()
    for name in tensors:
        best = None
        for owner in reversed(_owners(name)):
            if all(t in tensors for t in layout.tensors_under(owner)):
                best = owner
            else:
                break
        if best is None:
            raise ValueError(f"save_peft_adapter: head tensor {name} shares its HF module with untrained tensors; "
                             "PEFT's modules_to_save saves whole modules")
        modules.add(best)
    for m in modules:
        clash = [a for a in adapted_modules if a == m or a.startswith(m + ".")]
        if clash:
            raise ValueError(f"save_peft_adapter: adapted layers {clash} lie inside the trained head {m}; PEFT "
                             "never adapts a modules_to_save module")
        for other in layout.module_names():
            if other.endswith(m) and not all(t in tensors for t in layout.tensors_under(other)):
                raise ValueError(f"save_peft_adapter: modules_to_save name {m!r} would also select {other}")
    return sorted(modules), tensors


def save_peft_adapter(path: str | os.PathLike, adapted: Adapted, hf_config, *,
                      base_model_name_or_path: str | None = None, as_lora: bool = False) -> Path:
    """Writes `adapted` (VeRA or LoRA) as a PEFT adapter directory for the HF model `hf_config`
    describes, which `PeftModel.from_pretrained(hf_model, path)` loads to the same outputs.
    The directory is written atomically (a failure leaves no partial adapter).

    VeRA is written with `save_projection: true` (A and B stored: PEFT cannot redraw JAX's
    projections) and needs shared projections; trained head leaves (trainable_extra) become
    `modules_to_save`. Raises ValueError for what PEFT cannot hold (GPT-2's fused c_attn parts,
    unshared projections, head leaves that are part of a module with untrained tensors).
    `as_lora=True` writes a VeRA adapter as the LoRA adapter it exactly is (`to_lora`: no SVD,
    nothing lost; any projections), which PEFT and LoRA servers load.
    """
    if not isinstance(adapted, Adapted):
        raise TypeError(f"save_peft_adapter: expected an Adapted tree, got {type(adapted).__name__}")
    adapted = core.unstack(adapted)  # stacked (scanned) layers as the unrolled model HF names
    if as_lora:
        adapted = to_lora(adapted)
    mapping = registry.get(adapted.method).peft
    if mapping is None:
        raise ValueError(f"save_peft_adapter: method {adapted.method!r} is not a PEFT adapter (PEFT has no "
                         f"equivalent; those that have one: {_peft_methods()}); save it with save_adapter, or export "
                         "a merged checkpoint with export_merged")
    c = adapted.config
    why = mapping.refuse(c)
    if why is not None:
        raise ValueError(f"save_peft_adapter: {why}")
    hf_config = read_hf_config(hf_config)
    layout = hf_layout(adapted.base, hf_config, names="modules")
    names = {spec.path: _module_name(adapted, spec, layout) for spec in adapted.layers}
    modules_to_save, head = _modules_to_save(adapted, layout, [n for n, _ in names.values()])
    conv1d = {conv for _, conv in names.values()}
    tensors = {PREFIX + k: v for k, v in head.items()}
    common: dict[str, Any] = {
        "target_modules": sorted(n for n, _ in names.values()),
        "modules_to_save": modules_to_save or None,
        "fan_in_fan_out": conv1d == {True},
        "bias": "none",
        "layers_to_transform": None,
        "layers_pattern": None,
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
    }
    for spec in adapted.layers:
        vec = core.get_path(adapted.adapter, spec.path)
        name = PREFIX + names[spec.path][0]
        for leaf, suffix in mapping.tensors.items():
            tensors[f"{name}.{suffix}"] = np.asarray(jax.device_get(vec[leaf]), np.float32)
    if mapping.shared_projections:
        tensors[VERA_A] = np.asarray(jax.device_get(adapted.projections["A"]), np.float32)
        tensors[VERA_B] = np.asarray(jax.device_get(adapted.projections["B"]), np.float32)
    config = {"peft_type": mapping.peft_type, **mapping.to_peft(c), **common}
    return adapter_dir.write(Path(path), tensors, lambda _: config, metadata={"format": "pt"}, sort_keys=True)
