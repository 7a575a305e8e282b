"""Where each leaf of our param tree lives in the Hugging Face (PyTorch) checkpoint, found by
running the family's own `params_to_hf` instead of keeping a second name table.

Every leaf is replaced by a small integer marker array (the leaf's shape with its last axis cut to
1, numbered consecutively across the tree) and `params_to_hf` is applied to that tree. Each HF
tensor then holds the numbers of the leaves it came from, in the order they were laid out, which
tells its name and layout: a torch `nn.Linear` weight holds our kernel transposed, a GPT-2
`Conv1D` weight holds it as is, and GPT-2's fused `c_attn` holds the query, key and value kernels
side by side. The markers are small (about one number per input row of every kernel), so this
works on 7B-parameter trees. It assumes `params_to_hf` only transposes, reshapes or concatenates
along the last axis and never casts dtypes, which holds for every family.

Names come in two spellings. `params_to_hf` writes checkpoint names, which transformers 5
renames for some families when it builds the PyTorch model (ViT's
`vit.encoder.layer.0.attention.attention.query` is module `vit.layers.0.attention.q_proj`);
PEFT adapters name the modules of the model they were trained on, so older adapters use the
checkpoint spelling and newer ones the module spelling. `hf_layout(..., names="modules")` applies
transformers' own conversion mapping (found on a meta-device PyTorch model, so this needs torch;
without it the checkpoint spelling is used).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from vera_jax.adapters.core import _plain
from vera_jax.models import hub
from vera_jax.tree import flatten, unflatten

COPY, TRANSPOSE, FUSED, OTHER = "copy", "transpose", "fused", "other"


@dataclasses.dataclass(frozen=True)
class Placement:
    """One of our leaves inside an HF tensor: its name, and how the values are laid out there
    (COPY: same array; TRANSPOSE: our (in, out) kernel is torch's (out, in) weight; FUSED: one
    block of a tensor shared with other leaves; OTHER: any other rearrangement)."""

    hf: str
    layout: str
    shared_with: tuple[tuple[str, ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class HFLayout:
    """Leaf path -> Placement, and HF tensor name -> the leaf paths it holds (in its order)."""

    model_type: str
    leaves: dict[tuple[str, ...], Placement]
    tensors: dict[str, tuple[tuple[str, ...], ...]]

    def module_names(self) -> list[str]:
        """Every HF module that owns a tensor, and its parents (what `named_modules` lists)."""
        out = set()
        for name in self.tensors:
            parts = name.split(".")
            out.update(".".join(parts[:k]) for k in range(1, len(parts)))
        return sorted(out)

    def tensors_under(self, module: str) -> list[str]:
        return [t for t in self.tensors if t.startswith(module + ".")]

    def renamed(self, names: Mapping[str, str]) -> "HFLayout":
        """The same layout with HF tensor names replaced through `names` (unlisted ones kept)."""
        leaves = {path: dataclasses.replace(p, hf=names.get(p.hf, p.hf)) for path, p in self.leaves.items()}
        return HFLayout(self.model_type, leaves, {names.get(k, k): v for k, v in self.tensors.items()})


def read_hf_config(hf_config) -> dict:
    """`hf_config` as a dict: a dict as is, or a checkpoint directory / config.json path."""
    if isinstance(hf_config, Mapping):
        config = dict(hf_config)
    elif isinstance(hf_config, (str, os.PathLike)):
        path = Path(hf_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"hf_config: {path} does not exist")
        config = json.loads(path.read_text())
    else:
        raise TypeError(f"hf_config: expected a config.json dict or a path, got {type(hf_config).__name__}")
    if "model_type" not in config:
        raise ValueError("hf_config: no model_type field (pass the model's config.json)")
    hub.family(config["model_type"])
    return config


def module_names(hf_config: dict, checkpoint_names) -> dict[str, str]:
    """Checkpoint tensor name -> the name of that parameter in the PyTorch model transformers
    builds for `hf_config`'s architecture (only names that differ). Empty without torch."""
    try:
        import torch
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return {}
    config = transformers.AutoConfig.for_model(**hf_config)
    architecture = (hf_config.get("architectures") or [None])[0]
    with torch.device("meta"):
        if architecture is None:
            model = transformers.AutoModel.from_config(config)
        else:
            model = getattr(transformers, architecture)(config)
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    existing = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "")
    out = {}
    for name in checkpoint_names:
        renamed = rename_source_key(name, renamings, converters)[0]
        if renamed not in existing and prefix and f"{prefix}.{renamed}" in existing:
            renamed = f"{prefix}.{renamed}"  # a base-model checkpoint inside e.g. *ForMaskedLM
        if renamed != name and renamed in existing:
            out[name] = renamed
    return out


def hf_layout(params: Mapping, hf_config, names: str = "checkpoint") -> HFLayout:
    """Runs the family's `params_to_hf` on markers shaped like `params` (see the module doc);
    `names`: "checkpoint" (safetensors keys) or "modules" (PyTorch module names, what PEFT uses)."""
    if names not in ("checkpoint", "modules"):
        raise ValueError(f"names: expected 'checkpoint' or 'modules', got {names!r}")
    hf_config = read_hf_config(hf_config)
    params = _plain(params)
    paths, starts, markers = [], [], {}
    offset = 0
    for path, leaf in flatten(params).items():
        shape = np.shape(leaf)
        shape = shape[:-1] + (1,) if shape else ()
        size = math.prod(shape)
        markers[path] = np.arange(offset, offset + size, dtype=np.int64).reshape(shape)
        paths.append(path)
        starts.append(offset)
        offset += size
    hf = hub.family(hf_config["model_type"]).params_to_hf(unflatten(markers), hf_config)
    starts = np.asarray(starts)
    leaves, tensors = {}, {}
    for name, array in hf.items():
        index = np.searchsorted(starts, np.ravel(array), side="right") - 1
        found, first = np.unique(index, return_index=True)
        owners = tuple(paths[i] for i in found[np.argsort(first)])
        tensors[name] = owners
        if len(owners) > 1:
            for owner in owners:
                leaves[owner] = Placement(name, FUSED, owners)
            continue
        marker = markers[owners[0]]
        if array.shape == marker.shape and np.array_equal(array, marker):
            layout = COPY
        elif array.shape == marker.T.shape and np.array_equal(array, marker.T):
            layout = TRANSPOSE
        else:
            layout = OTHER
        leaves[owners[0]] = Placement(name, layout)
    layout = HFLayout(hf_config["model_type"], leaves, tensors)
    return layout.renamed(module_names(hf_config, tensors)) if names == "modules" else layout


def to_hf(value, placement: Placement, what: str) -> np.ndarray:
    """One leaf's value in its HF tensor's layout (only whole, copied or transposed tensors)."""
    value = np.asarray(value)
    if placement.layout == COPY:
        return np.ascontiguousarray(value)
    if placement.layout == TRANSPOSE:
        return np.ascontiguousarray(value.T)
    raise ValueError(f"{what}: HF tensor {placement.hf} is not a plain copy of one of our leaves "
                     f"(layout {placement.layout}); it cannot be read or written on its own")


def from_hf(value: np.ndarray, placement: Placement, like, what: str) -> np.ndarray:
    """Inverse of `to_hf`, checked against the shape of the leaf `like` it replaces."""
    expected = tuple(np.shape(like))
    if placement.layout == TRANSPOSE:
        expected = expected[::-1]
    elif placement.layout != COPY:
        to_hf(value, placement, what)
    if tuple(value.shape) != expected:
        raise ValueError(f"{what}: tensor {placement.hf} has shape {tuple(value.shape)}, expected {expected}")
    return np.asarray(value.T if placement.layout == TRANSPOSE else value)
