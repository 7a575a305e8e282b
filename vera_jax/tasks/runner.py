"""The generic runner every benchmark family runs on:

    config -> data (checked first) -> checkpoint -> model (+ fresh head) -> adapter -> trainer
           -> adapter file + summary.json

A family (`Family`) says only what is specific to it: how to load its data, the model options it
needs (e.g. num_labels) and the trainer parts (`Parts`: examples, collate, loss, evals). Everything
else lives here once: the model, loaded by `vera_jax.models.loader` from one spec of
`config.model` (resolution with offline advice, quantization, fresh heads), the method's adapter
built from every field of `config.vera` / `config.lora`, the per-group learning rates from `config.lr`,
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

import jax
import ml_collections

import vera_jax
from vera_jax import train as train_lib
from vera_jax.adapters.core import per_layer_view
from vera_jax.adapters.methods import registry
from vera_jax.data.common import DataUnavailableError
from vera_jax.models import common, loader
from vera_jax.models.loader import CheckpointUnavailableError, ConfigError
from vera_jax.models.loader import LoadedModel as Model
from vera_jax.tasks.config import SET_BY_RUNNER, method_config, model_config  # noqa: F401 - a config's API


@dataclasses.dataclass
class Parts:
    """What a family gives the trainer: training examples (grain.MapDataset of single examples),
    loss_fn(params, batch, rng) -> (loss, aux), named evals, the collate step and lengths for
    bucketing (see `vera_jax.train.Task`), the metric that picks the best eval when the config
    names none, facts for the summary, and `finish(workdir, summary, adapted) -> dict`, run on
    process 0 after training (e.g. a results file in another project's layout), whose facts join
    the summary."""

    train: Any
    loss_fn: Callable
    evals: dict
    collate: Optional[Callable] = None
    train_lengths: Any = None
    sort_window: int = 0
    best_metric: str = ""
    info: dict = dataclasses.field(default_factory=dict)
    finish: Optional[Callable] = None


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


def runnable_methods(config) -> list[str]:
    """The registered methods `config` can run: one that adapts layers needs its section
    `config.<method>` and rate `config.lr.<method>`; one that trains only the head needs `model.head`."""

    def runnable(name):
        method = registry.get(name)
        if method.adapts_layers:
            return name in config and name in config.lr
        return method.trains_base or bool(config.model.head)

    return [name for name in registry.names() if runnable(name)]


def _method(config) -> vera_jax.Method:
    """The registered method `config.method` names; ConfigError listing those this config can run,
    and what a registered one lacks here."""
    allowed = runnable_methods(config)
    if config.method not in registry.names():
        raise ConfigError(f"method: expected one of {allowed}, got {config.method!r}")
    method = vera_jax.get_method(config.method)
    if config.method not in allowed:
        needs = (f"a section config.{config.method} (the {method.config_class.__name__} fields, e.g. "
                 f"runner.method_config({method.config_class.__name__}, r=...)) and a rate lr.{config.method}"
                 if method.adapts_layers else "modules to train in model.head, which is empty")
        raise ConfigError(f"method: {config.method!r} needs {needs}; this config runs {allowed}")
    return method


def attach(params, config) -> vera_jax.Adapted:
    """The method's adapter on `params`: its config class (from the registry) built from every
    field of `config.<method>` (e.g. config.vera; none for head/full), config.seed when the class
    has a seed; the modules of config.model.head always train."""
    method = _method(config)
    cls = method.config_class
    section = config[config.method] if method.adapts_layers else {}
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items()}
    fields["trainable_extra"] = tuple(config.model.head)
    if "seed" in cls.field_names():
        fields["seed"] = config.seed
    try:
        method_cfg = cls(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{config.method}: {e}") from e
    return vera_jax.attach(params, method_cfg)


def learning_rates(config) -> dict:
    """Peak lr per optimizer group from `config.lr` (the one place rates are set): the method's
    adapter rate (lr.<method>: lr.vera, lr.lora, lr.dvora) when it adapts layers, lr.head, lr.full.
    An entry may be a {method: rate} dict
    (e.g. lr.head when the paper tunes the head's rate per method): config.method picks from it."""
    if len(config.optimizer.learning_rates):
        raise ConfigError("optimizer.learning_rates: set by the runner from config.lr; set lr.vera, lr.lora, "
                          f"lr.head or lr.full instead (got {sorted(config.optimizer.learning_rates)})")

    def rate(name):
        if name not in config.lr:
            raise ConfigError(f"lr.{name}: missing; config.lr has {sorted(config.lr.keys())}")
        value = config.lr[name]
        if not hasattr(value, "keys"):
            return value
        if config.method not in value:
            raise ConfigError(f"lr.{name}: no rate for method {config.method!r}; it has {sorted(value.keys())}")
        return value[config.method]

    rates = {"head": rate("head"), "full": rate("full")}
    if _method(config).adapts_layers:
        rates["adapter"] = rate(config.method)
    return rates


def model_spec(config, **options) -> loader.ModelSpec:
    """The `vera_jax.models.loader` spec of `config.model` (options: num_labels, architecture, advice)."""
    return loader.ModelSpec.from_config(config, **options)


def checkpoint_path(config, advice: str = "") -> Optional[str]:
    """The local path of `config.model.checkpoint` (`loader.resolve`); None for a config shipped
    with vera_jax under model.random_init, which needs no files."""
    return loader.resolve(model_spec(config, advice=advice))


def load_model(config, path: Optional[str] = None, *, num_labels: Optional[int] = None,
               architecture: Optional[str] = None) -> Model:
    """The model of `config.model` (`loader.load_model`) from its local `path` (default: resolved)."""
    return loader.load_model(model_spec(config, num_labels=num_labels, architecture=architecture), path)


def _validate(config) -> None:
    method = _method(config)
    model_spec(config)  # config.model's own fields (model.quantize, model.dtype, ...), checked by the loader
    quantize = config.model.get("quantize", "")
    if quantize and config.adapter_path == "merged":
        raise ConfigError(f"adapter_path: 'merged' would merge into the kernels model.quantize={quantize!r} keeps "
                          "quantized (never done); use 'factored' or 'auto'")
    if quantize and method.trains_base:
        raise ConfigError(f"method: {config.method!r} would train the kernels model.quantize={quantize!r} keeps "
                          f"frozen; use one of {[n for n in registry.names() if not registry.get(n).trains_base]}")


def build(family: Family, config) -> tuple[train_lib.Task, dict, ml_collections.ConfigDict]:
    """(trainer Task, facts for the summary, resolved config with the learning-rate groups and the
    best metric filled in): everything `run` does before training, for inspection in a notebook."""
    task, info, config, _ = _build(family, config)
    return task, info, config


def _build(family: Family, config):
    _validate(config)
    config = config.copy_and_resolve_references()
    spec = model_spec(config, advice=family.advice)
    path = loader.resolve(spec)
    data = family.load_data(config)
    spec = dataclasses.replace(spec, **family.model_options(config, data))
    model = family.adapt_model(config, loader.load_model(spec, path))
    parts = family.make_parts(config, model, data)
    # a scanned model's params carry their axis names, so the adapter finds the stacked layer axis
    params = common.boxed(model.params, model.param_axes) if spec.scan_layers else model.params
    try:
        adapted = attach(params, config)
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
            # per layer (a stacked kernel's masked layers, left out by layers_to_transform, not counted)
            "adapter_params": int(sum(x.size for x in jax.tree.leaves(per_layer_view(adapted).adapter))),
            "trainable_params": vera_jax.count_trainable(adapted)}
    return task, info, config, parts


def run(family: Family, config, workdir: str) -> dict:
    """One run of `family` per `config`; returns (and writes to workdir/summary.json) the trainer's
    summary (per-eval history in "evals", "best", "final") with the family's facts, parameter
    counts and the whole run's wall time; saves the trained adapter to workdir/adapter."""
    start = time.time()
    task, info, config, parts = _build(family, config)
    result = train_lib.train_and_evaluate(config, workdir, task)
    summary = {**result.summary, **info, "wall_time_s": time.time() - start}
    if jax.process_index() == 0:
        if parts.finish is not None:
            summary.update(parts.finish(workdir, summary, result.adapted))
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
