"""The generic runner every benchmark family runs on:

    config -> data (checked first) -> checkpoint -> model (+ fresh head) -> adapter -> trainer
           -> adapter file + summary.json

A family (`Family`) says only what is specific to it: how to load its data, the model options it
needs (e.g. num_labels) and the trainer parts (`Parts`: examples, collate, loss, evals). Everything
else lives here once: checkpoint resolution with offline advice, the method's adapter built from
every field of `config.vera` / `config.lora`, the per-group learning rates from `config.lr`,
parameter counts, the adapter file and the run summary.

    summary = runner.run(glue.FAMILY, config, workdir)      # from a notebook
    python -m experiments.glue --config configs/minilm_sst2.py   # from the shell
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

import vera_jax
from vera_jax import quant
from vera_jax import train as train_lib
from vera_jax.data.common import DataUnavailableError, hub_unreachable
from vera_jax.models import common as model_common
from vera_jax.models import hub

METHODS = ("vera", "lora", "full", "head")
METHOD_CONFIGS = {"vera": vera_jax.VeraConfig, "lora": vera_jax.LoraConfig}
SET_BY_RUNNER = ("seed", "trainable_extra")  # method config fields the runner fills in
CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForImageClassification")


class ConfigError(ValueError):
    """A config field has a value the run cannot use; the message names the field."""


class CheckpointUnavailableError(RuntimeError):
    """The model checkpoint is neither a local path, nor cached, nor downloadable."""


@dataclasses.dataclass
class Model:
    """A loaded model: the linen module, plain params, tokenizer (or None), HF config, the local
    checkpoint path, and the logical axis names of the params (for sharding)."""

    module: nn.Module
    params: dict
    tokenizer: Any
    hf_config: dict
    path: str
    param_axes: Any


@dataclasses.dataclass
class Parts:
    """What a family gives the trainer: training examples (grain.MapDataset of single examples),
    loss_fn(params, batch, rng) -> (loss, aux), named evals, the collate step and lengths for
    bucketing (see `vera_jax.train.Task`), the metric that picks the best eval when the config
    names none, and facts for the summary."""

    train: Any
    loss_fn: Callable
    evals: dict
    collate: Optional[Callable] = None
    train_lengths: Any = None
    sort_window: int = 0
    best_metric: str = ""
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Family:
    """One benchmark family.

    load_data(config) -> data: read (or check) the data before the model loads, so a missing
        dataset fails fast; raise DataUnavailableError with advice when offline.
    model_options(config, data) -> dict: extra `load_model` options (num_labels, architecture).
    make_parts(config, model, data) -> Parts.
    adapt_model(config, model) -> Model: the loaded model changed before the adapter attaches
        (e.g. a ViT's position embeddings interpolated to another image size); default: as loaded.
    user_errors: exception types that mean bad input (the CLI prints one line, exits 2).
    advice: how to pass the family's data offline, appended to the offline checkpoint error.
    run_name(config) -> the default workdir's last part.
    """

    name: str
    load_data: Callable
    make_parts: Callable
    model_options: Callable = lambda config, data: {}
    adapt_model: Callable = lambda config, model: model
    user_errors: tuple = ()
    advice: str = ""
    run_name: Callable = lambda config: f"{config.method}-s{config.seed}"


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


def model_config() -> ml_collections.ConfigDict:
    """The `config.model` fields the runner reads."""
    m = ml_collections.ConfigDict()
    m.checkpoint = ""  # Hub id, local checkpoint dir (config.json, *.safetensors, tokenizer) or .gguf file
    m.tokenizer = ""  # a tokenizer directory, when the checkpoint has none
    m.head = ("classifier",)  # modules trained in every method, at lr.head (trainable_extra)
    m.random_init = False  # True: only the checkpoint's config.json; weights drawn from `seed`
    m.overrides = ml_collections.ConfigDict()  # HF config fields replaced before building (e.g. layers)
    m.quantize = ""  # "" | "nf4" | "int8": frozen linear kernels (all but lm_head and model.head) kept quantized;
    # "gguf": a .gguf checkpoint's Q4_0/Q4_1 linear weights kept in their stored 4-bit blocks
    return m


def method_config(cls, **values) -> ml_collections.ConfigDict:
    """Every field of VeraConfig / LoraConfig but those the runner sets, with the class defaults
    updated by `values`, so any of them can be set from the command line or swept."""
    out = ml_collections.ConfigDict()
    for name in cls.field_names():
        if name in SET_BY_RUNNER:
            continue
        value = values.pop(name, getattr(cls(), name))
        out[name] = ml_collections.config_dict.placeholder(tuple) if value is None else value
    if values:
        raise ConfigError(f"{cls.method}: unknown fields {sorted(values)}; allowed: {sorted(out)}")
    return out


def attach(params, config) -> vera_jax.Adapted:
    """The method's adapter on `params` (config.method, config.vera / config.lora, config.seed);
    the modules of config.model.head always train."""
    head = tuple(config.model.head)
    if config.method in METHOD_CONFIGS:
        cls = METHOD_CONFIGS[config.method]
        fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config[config.method].items()}
        try:
            method_cfg = cls(**fields, seed=config.seed, trainable_extra=head)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{config.method}: {e}") from e
        apply = vera_jax.apply_vera if config.method == "vera" else vera_jax.apply_lora
        return apply(params, method_cfg)
    if config.method == "full":
        return vera_jax.apply_full(params, head)
    return vera_jax.apply_head(params, head)


def learning_rates(config) -> dict:
    """Peak lr per optimizer group from `config.lr` (the one place rates are set): the method's
    adapter rate (lr.vera or lr.lora), lr.head, lr.full. An entry may be a {method: rate} dict
    (e.g. lr.head when the paper tunes the head's rate per method): config.method picks from it."""
    if len(config.optimizer.learning_rates):
        raise ConfigError("optimizer.learning_rates: set by the runner from config.lr; set lr.vera, lr.lora, "
                          f"lr.head or lr.full instead (got {sorted(config.optimizer.learning_rates)})")

    def rate(name):
        value = config.lr[name]
        if not hasattr(value, "keys"):
            return value
        if config.method not in value:
            raise ConfigError(f"lr.{name}: no rate for method {config.method!r}; it has {sorted(value.keys())}")
        return value[config.method]

    rates = {"head": rate("head"), "full": rate("full")}
    if config.method in METHOD_CONFIGS:
        rates["adapter"] = rate(config.method)
    return rates


def _needs_fresh_head(hf_config: dict, num_labels) -> bool:
    archs = hf_config.get("architectures") or ()
    return num_labels is not None and not any(a.endswith(CLASSIFIER_SUFFIXES) for a in archs)


def _bundled(config) -> bool:
    return bool(config.model.random_init) and config.model.checkpoint in hub.bundled_configs()


def checkpoint_path(config, advice: str = "") -> Optional[str]:
    """The local path of `config.model.checkpoint` (see `resolve_checkpoint`); None for a config
    shipped with vera_jax (`hub.bundled_configs()`, e.g. "vit-base-patch16-224-in21k") under
    model.random_init, which needs no files."""
    if not config.model.checkpoint:
        raise ConfigError("model.checkpoint: empty; give a Hub id, a local checkpoint directory or a .gguf file")
    if _bundled(config):
        return None
    return resolve_checkpoint(config.model.checkpoint, config.network_timeout, advice)


def _streamed_load(config, path: str) -> dict:
    """`hub.from_pretrained` options that quantize a safetensors checkpoint directory while it is
    read, one tensor at a time (model.quantize "nf4" | "int8"), so a 7B/13B model never sits in host
    memory in full precision; placed as the trainer's mesh (config.mesh) will shard it. Empty for
    no quantization and for a .gguf file (read whole, then quantized by `load_model`)."""
    m = config.model
    if m.get("quantize") not in quant.METHODS or not os.path.isdir(path):
        return {}
    options = {"quantize": m.quantize, "quantize_skip": quant.DEFAULT_SKIP + tuple(m.head)}
    if "mesh" in config:
        options.update(mesh=train_lib.make_mesh(config.mesh), rules=tuple(tuple(r) for r in config.mesh.rules))
    return options


def load_model(config, path: Optional[str] = None, *, num_labels: Optional[int] = None,
               architecture: Optional[str] = None) -> Model:
    """The model of `config.model` from its local `path` (default: `checkpoint_path(config)`): the
    checkpoint's weights, or with random_init its config with weights drawn from config.seed. A
    classifier the checkpoint lacks is drawn from config.seed, so seeds differ in its start too."""
    m = config.model
    path = path or checkpoint_path(config)
    overrides = dict(m.overrides)
    if m.random_init or overrides:
        if not m.random_init:
            raise ConfigError("model.overrides: only with model.random_init=True (pretrained weights fix the shapes)")
        stored = hub.bundled_config(m.checkpoint) if path is None else hub.read_config(path)
        hf_config = hub.task_config({**stored, **overrides}, num_labels, architecture)
        fam = hub.family(hf_config["model_type"])
        chosen = hf_config["architectures"][0] if num_labels is not None or architecture is not None else None
        module = fam.build(hf_config, architecture=chosen)
        params = jax.jit(module.init)(jax.random.key(config.seed), *fam.dummy_inputs(hf_config))["params"]
        params = nn.unbox(params)
        tokenizer = hub.load_tokenizer(path) if path and os.path.isdir(path) else None
    else:
        stored = hub.read_config(path)
        module, params, tokenizer = hub.from_pretrained(path, num_labels=num_labels, architecture=architecture,
                                                        **_streamed_load(config, path))
        hf_config = hub.task_config(stored, num_labels, architecture)
        if _needs_fresh_head(stored, num_labels):
            fresh = model_common.init_subtrees(module, hub.family(hf_config["model_type"]).dummy_inputs(hf_config),
                                               ["classifier"], config.seed)
            params = {**params, "classifier": jax.tree.map(jnp.asarray, fresh["classifier"])}
    if m.tokenizer:
        tokenizer = hub.load_tokenizer(m.tokenizer)
    dummy = hub.family(hf_config["model_type"]).dummy_inputs(hf_config)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy))
    param_axes = nn.get_partition_spec(boxed)["params"]
    if m.get("quantize") == "gguf":
        if not str(path).endswith(".gguf"):
            raise ConfigError(f"model.quantize: 'gguf' keeps a .gguf file's 4-bit blocks; model.checkpoint {path!r} "
                              "is not a .gguf file (use 'nf4' or 'int8' for other checkpoints)")
        from vera_jax.models import gguf

        params = gguf.keep_4bit(params, path)
        param_axes = quant.quantized_axes(params, param_axes)
    elif m.get("quantize"):
        if not quant.has_quantized(params):  # random_init or a .gguf file: quantized here, whole
            params = quant.quantize_params(params, m.quantize, skip=quant.DEFAULT_SKIP + tuple(m.head))
        param_axes = quant.quantized_axes(params, param_axes)
    return Model(module=module, params=params, tokenizer=tokenizer, hf_config=hf_config, path=path or m.checkpoint,
                 param_axes=param_axes)


def _validate(config) -> None:
    if config.method not in METHODS:
        raise ConfigError(f"method: expected one of {METHODS}, got {config.method!r}")
    quantize = config.model.get("quantize", "")
    if quantize not in ("", *quant.METHODS, "gguf"):
        raise ConfigError(f"model.quantize: expected one of {['', *quant.METHODS, 'gguf']}, got {quantize!r}")
    if quantize and config.adapter_path == "merged":
        raise ConfigError(f"adapter_path: 'merged' would merge into the kernels model.quantize={quantize!r} keeps "
                          "quantized (never done); use 'factored' or 'auto'")
    if quantize and config.method == "full":
        raise ConfigError(f"method: 'full' would train the kernels model.quantize={quantize!r} keeps frozen; "
                          "use vera, lora or head")


def build(family: Family, config) -> tuple[train_lib.Task, dict, ml_collections.ConfigDict]:
    """(trainer Task, facts for the summary, resolved config with the learning-rate groups and the
    best metric filled in): everything `run` does before training, for inspection in a notebook."""
    _validate(config)
    config = config.copy_and_resolve_references()
    path = checkpoint_path(config, family.advice)
    data = family.load_data(config)
    model = family.adapt_model(config, load_model(config, path, **family.model_options(config, data)))
    parts = family.make_parts(config, model, data)
    try:
        adapted = attach(model.params, config)
    except ConfigError:
        raise
    except ValueError as e:  # the method's config does not fit this model, e.g. targets matching no layer
        raise ConfigError(f"{config.method}: {e}") from e
    for group, rate in learning_rates(config).items():
        config.optimizer.learning_rates[group] = rate
    if not config.best_metric:
        config.best_metric = parts.best_metric
    task = train_lib.Task(adapted=adapted, loss_fn=parts.loss_fn, train_data=parts.train, evals=parts.evals,
                          collate=parts.collate, train_lengths=parts.train_lengths, sort_window=parts.sort_window,
                          param_axes=model.param_axes, name=f"{family.name}-{config.method}")
    info = {"family": family.name, "method": config.method, "checkpoint": config.model.checkpoint,
            "seed": config.seed, **parts.info,
            "adapter_params": int(sum(x.size for x in jax.tree.leaves(adapted.adapter))),
            "trainable_params": vera_jax.count_trainable(adapted)}
    return task, info, config


def run(family: Family, config, workdir: str) -> dict:
    """One run of `family` per `config`; returns (and writes to workdir/summary.json) the trainer's
    summary (per-eval history in "evals", "best", "final") with the family's facts, parameter
    counts and the whole run's wall time; saves the trained adapter to workdir/adapter."""
    start = time.time()
    task, info, config = build(family, config)
    result = train_lib.train_and_evaluate(config, workdir, task)
    summary = {**result.summary, **info, "wall_time_s": time.time() - start}
    if jax.process_index() == 0:
        if config.save_adapter:
            vera_jax.save_adapter(os.path.join(workdir, "adapter"), result.adapted)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return summary


class _Placeholder:
    """Stands in for a config in `Family.run_name`: every field reads as `<field>`."""

    def __init__(self, name: str = "config"):
        self._name = name

    def __getattr__(self, name: str) -> "_Placeholder":
        return _Placeholder(name)

    __getitem__ = __getattr__

    def __format__(self, spec: str) -> str:
        return f"<{self._name}>"

    __str__ = __repr__ = lambda self: f"<{self._name}>"  # noqa: E731


def default_workdir(family: Family, config=None) -> str:
    """Where `main` writes when no --workdir is given; without a config, the pattern with each
    config field as `<field>` (for --help), e.g. /tmp/vera_glue/<task>-<method>-s<seed>."""
    return f"/tmp/vera_{family.name}/{family.run_name(_Placeholder() if config is None else config)}"


def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


def result_line(family: Family, summary: dict, workdir: str) -> dict:
    """The CLI's last line: the best eval's metrics, saying which eval and epoch they come from,
    beside the last eval's."""
    best, final = summary["best"], summary["final"]
    if best.get("step") is None:
        source = "none: no eval gave a finite value"
    else:
        when = (f"epoch {_fmt(best['epoch'])} of {_fmt(summary['epochs'])}" if best.get("epoch") is not None
                else f"step {best['step']} of {summary['steps']}")
        source = f"best {best['eval']} eval by {best['mode']} {best['metric']}: {when}"
    last = {"epoch": summary.get("epochs"), "step": summary.get("steps"), **(final.get("eval") or {})}
    return {"family": family.name, "method": summary["method"], "metrics_from": source,
            **(best.get("metrics") or {}), "best_step": best.get("step"), "best_epoch": best.get("epoch"),
            "last": last, "trainable_params": summary["trainable_params"],
            "wall_time_s": round(summary["wall_time_s"], 1), "workdir": workdir}


def main(family: Family, config, workdir: Optional[str]) -> dict:
    """The CLI body every experiment shares: distributed init, the run, one JSON line on stdout
    (`result_line`); bad input (a user error of the family or the runner) prints one line and
    exits 2."""
    if config is None:
        print(f"error: --config is required, e.g. --config configs/<{family.name} config>.py", file=sys.stderr)
        sys.exit(2)
    workdir = workdir or default_workdir(family, config)
    train_lib.initialize_distributed(config)
    errors = (ConfigError, CheckpointUnavailableError, DataUnavailableError, FileNotFoundError) + family.user_errors
    try:
        summary = run(family, config, workdir)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result_line(family, summary, workdir)))
    return summary
