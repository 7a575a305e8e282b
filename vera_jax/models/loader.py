"""The one model loader: a `ModelSpec` (what to load, how) -> a `LoadedModel` (module, params,
tokenizer, HF config, local path, logical axes). The runner, the server, `experiments/mt_bench`
and the benchmarks all load through it.

    model = load_model(ModelSpec("HuggingFaceTB/SmolLM2-135M", quantize="nf4", dtype="bfloat16"))
    path = resolve(spec); ...; model = load_model(spec, path)    # fail fast before reading data

Resolution: a local checkpoint directory or `.gguf` file as is; a Hub id from the Hub cache, else
downloaded when the Hub answers, else `CheckpointUnavailableError` saying how to pass local files.
A config shipped with vera_jax (`hub.bundled_configs()`) under `random_init` needs no files.
Loading: safetensors quantized while read ("nf4" | "int8", one tensor at a time, placed on
`mesh`), a `.gguf` file's 4-bit blocks kept ("gguf"), a classifier the checkpoint lacks drawn
from `seed`. A spec's fields are `config.model`'s (plus the run's seed, timeout and mesh), and a
bad value is a `ConfigError` naming `model.<field>`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vera_jax import quant, sharding
from vera_jax.errors import ConfigError
from vera_jax.models import common, hub
from vera_jax.network import hub_unreachable

QUANTIZE = ("", *quant.METHODS, "gguf")
DTYPES = ("float32", "bfloat16", "float16")
CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForImageClassification")


class CheckpointUnavailableError(RuntimeError):
    """The model checkpoint is neither a local path, nor cached, nor downloadable."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What to load.

    checkpoint: Hub id, local checkpoint dir (config.json, *.safetensors, tokenizer) or .gguf file;
        with random_init also a bundled config name (e.g. "gpt2-medium").
    tokenizer: a tokenizer directory, when the checkpoint has none.
    head: modules trained in every method (the classifier): never quantized.
    random_init: only the checkpoint's config; weights drawn from `seed`.
    overrides: HF config fields replaced before building (random_init only).
    quantize: "" | "nf4" | "int8" (frozen linear kernels but lm_head and `head`, quantized while
        read) | "gguf" (a .gguf file's Q4_0/Q4_1 linear weights kept in their stored blocks).
    dtype: the params' and the module's dtype ("float32" | "bfloat16" | "float16").
    num_labels, architecture: the head to build (see `hub.task_config`).
    seed: random_init weights and a fresh classifier.
    mesh, rules: where a quantized safetensors load places each leaf: the logical-axis rules
        (the trainer's config.mesh.rules) onto `mesh`, as the trainer shards it.
    scan_layers: the blocks under one nn.scan, their params stacked on a leading "layers" axis
        (compile time flat in depth); the same checkpoints load, stacked (not with `quantize`).
    network_timeout: seconds to wait for the Hub before failing with advice.
    advice: appended to the offline error (how to pass the rest of a run's inputs offline).
    """

    checkpoint: str
    tokenizer: str = ""
    head: tuple = ()
    random_init: bool = False
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    quantize: str = ""
    dtype: str = "float32"
    num_labels: Optional[int] = None
    architecture: Optional[str] = None
    seed: int = 0
    mesh: Optional[jax.sharding.Mesh] = None
    rules: tuple = ()
    network_timeout: float = 5.0
    advice: str = ""
    scan_layers: bool = False

    def __post_init__(self):
        if not self.checkpoint:
            raise ConfigError("model.checkpoint: empty; give a Hub id, a local checkpoint directory or a .gguf file")
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"model.quantize: expected one of {list(QUANTIZE)}, got {self.quantize!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype: expected one of {list(DTYPES)}, got {self.dtype!r}")
        if self.scan_layers and self.quantize:
            raise ConfigError(f"model.scan_layers: True with model.quantize={self.quantize!r} is not supported (a "
                              "stacked quantized base); set model.scan_layers=False or model.quantize=''")
        if self.overrides and not self.random_init:
            raise ConfigError("model.overrides: only with model.random_init=True (pretrained weights fix the shapes)")
        if self.mesh is not None and not self.rules:
            raise ValueError("ModelSpec: mesh is given without rules (logical axis -> mesh axis), e.g. "
                             "vera_jax.train.default_config().mesh.rules")

    @classmethod
    def from_config(cls, config, **options) -> "ModelSpec":
        """The spec of a run config: `config.model` (see `tasks.runner.model_config`), its seed,
        network_timeout and mesh; `options` set the rest (num_labels, architecture, advice)."""
        m = config.model
        mesh = {}
        if m.get("quantize") in quant.METHODS and "mesh" in config:
            mesh = dict(mesh=sharding.make_mesh(config.mesh), rules=tuple(tuple(r) for r in config.mesh.rules))
        return cls(checkpoint=m.checkpoint, tokenizer=m.tokenizer, head=tuple(m.head), random_init=bool(m.random_init),
                   overrides=dict(m.overrides), quantize=m.get("quantize", ""), dtype=m.get("dtype", "float32"),
                   scan_layers=bool(m.get("scan_layers", False)), seed=config.seed,
                   network_timeout=config.network_timeout, **mesh, **options)


@dataclasses.dataclass
class LoadedModel:
    """A loaded model: the linen module, plain params, tokenizer (or None), HF config, the local
    checkpoint path, and the logical axis names of the params (for sharding)."""

    module: nn.Module
    params: dict
    tokenizer: Any
    hf_config: dict
    path: str
    param_axes: Any


def resolve_checkpoint(name: str, timeout: float, advice: str = "") -> str:
    """Local path for `name`: itself (a directory or .gguf file), the Hub cache, or a download
    when the Hub is reachable; offline, fails at once saying how to pass local files."""
    if os.path.isdir(name) or (os.path.isfile(name) and name.endswith(".gguf")):
        return name
    if name.startswith((".", "/", "~")) or name.endswith(".gguf"):
        raise FileNotFoundError(f"model.checkpoint: {name} is not a checkpoint directory or .gguf file")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (the next step says whether it can be fetched)
        pass
    reason = hub_unreachable(timeout)
    if reason is not None:
        raise CheckpointUnavailableError(
            f"model.checkpoint {name!r} is not a local directory, not in the Hugging Face cache, and cannot be "
            f"downloaded ({reason}). Offline, pass a local checkpoint directory (config.json, *.safetensors, "
            f"tokenizer files) or a .gguf file, e.g. --config.model.checkpoint=/path/to/{name.split('/')[-1]}"
            + (f"; {advice}" if advice else "."))
    return hub.resolve(name)


def resolve(spec: ModelSpec) -> Optional[str]:
    """The local path of `spec.checkpoint` (see `resolve_checkpoint`); None for a bundled config
    under random_init, which needs no files."""
    if spec.random_init and spec.checkpoint in hub.bundled_configs():
        return None
    return resolve_checkpoint(spec.checkpoint, spec.network_timeout, spec.advice)


def load_model(spec: ModelSpec, path: Optional[str] = None) -> LoadedModel:
    """The model `spec` names, from its local `path` (default: `resolve(spec)`)."""
    path = resolve(spec) if path is None else path
    dtype = jnp.dtype(spec.dtype)
    skip = quant.DEFAULT_SKIP + tuple(spec.head)
    if spec.quantize == "gguf" and not str(path).endswith(".gguf"):
        raise ConfigError(f"model.quantize: 'gguf' keeps a .gguf file's 4-bit blocks; model.checkpoint {path!r} "
                          "is not a .gguf file (use 'nf4' or 'int8' for other checkpoints)")
    if spec.random_init:
        stored = hub.bundled_config(spec.checkpoint) if path is None else hub.read_config(path)
        hf_config = hub.task_config({**stored, **spec.overrides}, spec.num_labels, spec.architecture)
        module, params = _random(hf_config, dtype, spec.seed, _chosen(spec, hf_config), scan_layers=spec.scan_layers)
        tokenizer = hub.load_tokenizer(path) if path and os.path.isdir(path) else None
    else:
        stored = hub.read_config(path)
        streamed = {}
        if spec.quantize in quant.METHODS and os.path.isdir(path):  # quantized while read, one tensor at a time
            streamed = dict(quantize=spec.quantize, quantize_skip=skip)
            if spec.mesh is not None:
                streamed.update(mesh=spec.mesh, rules=spec.rules)
        module, params, tokenizer = hub.from_pretrained(path, dtype=dtype, param_dtype=dtype,
                                                        num_labels=spec.num_labels, architecture=spec.architecture,
                                                        scan_layers=spec.scan_layers, **streamed)
        hf_config = hub.task_config(stored, spec.num_labels, spec.architecture)
        if _needs_fresh_head(stored, spec.num_labels):
            fresh = common.init_subtrees(module, hub.family(hf_config["model_type"]).dummy_inputs(hf_config),
                                         ["classifier"], spec.seed)
            params = {**params, "classifier": jax.tree.map(jnp.asarray, fresh["classifier"])}
    if spec.tokenizer:
        tokenizer = hub.load_tokenizer(spec.tokenizer)
    param_axes = _param_axes(module, hf_config)
    if spec.quantize == "gguf":
        from vera_jax.models import gguf

        params = gguf.keep_4bit(params, path)
        param_axes = quant.quantized_axes(params, param_axes)
    elif spec.quantize:
        if not quant.has_quantized(params):  # random_init or a .gguf file: quantized here, whole
            params = quant.quantize_params(params, spec.quantize, skip=skip)
        param_axes = quant.quantized_axes(params, param_axes)
    return LoadedModel(module=module, params=params, tokenizer=tokenizer, hf_config=hf_config,
                       path=path or spec.checkpoint, param_axes=param_axes)


def random_model(hf_config: dict, *, dtype: str = "float32", seed: int = 0, architecture: Optional[str] = None,
                 abstract: bool = False, scan_layers: bool = False) -> LoadedModel:
    """The model of an HF config dict (e.g. `hub.bundled_config(name)` with fields replaced) with
    weights drawn from `seed`, no files read; `abstract`: params as `jax.ShapeDtypeStruct`s, nothing
    allocated (XLA's FLOP counts of a model larger than this machine); `scan_layers`: the scanned
    model (its params stacked from the same draw as the unrolled one's). For benchmarks and tests."""
    module, params = _random(hf_config, jnp.dtype(dtype), seed, architecture, abstract, scan_layers)
    return LoadedModel(module=module, params=params, tokenizer=None, hf_config=hf_config, path="",
                       param_axes=_param_axes(module, hf_config))


def _random(hf_config: dict, dtype, seed: int, architecture: Optional[str], abstract: bool = False,
            scan_layers: bool = False):
    """(module, params) drawn from `seed`; a scanned module gets its unrolled twin's draw, stacked, so
    both layouts of one seed hold the same weights."""
    fam = hub.family(hf_config["model_type"])
    module = fam.build(hf_config, dtype=dtype, param_dtype=dtype, architecture=architecture)
    init = jax.eval_shape if abstract else lambda f, *args: jax.jit(f)(*args)
    params = nn.unbox(init(module.init, jax.random.key(seed), *fam.dummy_inputs(hf_config))["params"])
    if scan_layers:
        module = module.clone(scan_layers=True)
        params = jax.eval_shape(common.stack_layers, params) if abstract else jax.jit(common.stack_layers)(params)
    return module, params


def _param_axes(module: nn.Module, hf_config: dict):
    dummy = hub.family(hf_config["model_type"]).dummy_inputs(hf_config)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy))
    return nn.get_partition_spec(boxed)["params"]


def _chosen(spec: ModelSpec, hf_config: dict) -> Optional[str]:
    """The architecture to build: the task's when a head was asked for, else the config's own."""
    return hf_config["architectures"][0] if spec.num_labels is not None or spec.architecture is not None else None


def _needs_fresh_head(hf_config: dict, num_labels) -> bool:
    archs = hf_config.get("architectures") or ()
    return num_labels is not None and not any(a.endswith(CLASSIFIER_SUFFIXES) for a in archs)
