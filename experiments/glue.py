"""GLUE fine-tuning with VeRA, LoRA, full fine-tuning or the head only (the paper's Table 2).

    python -m experiments.glue --config configs/roberta_large_rte.py --workdir /tmp/rte
    python -m experiments.glue --config configs/roberta_base_mrpc.py:method=lora --workdir /tmp/mrpc
    python -m experiments.glue --config configs/minilm_rte.py --config.data.dir=../shared/data/glue

The checkpoint (`config.model.checkpoint`: a Hub id or a local directory with config.json,
safetensors and tokenizer files) and the data (tfds `glue/<task>`, or GLUE TSVs under
`config.data.dir`) are checked before anything heavy runs: offline, a Hub id or an unprepared tfds
dataset fails within seconds saying how to point at local files. Writes to the workdir the
trainer's metrics.jsonl (an eval line at the end of every epoch), summary.json, checkpoints/, the
trained adapter (adapter/) and glue_summary.json (per-epoch dev metrics, best epoch, trainable
parameters, wall time).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from ml_collections import config_flags

import vera_jax
from vera_jax import data as data_lib
from vera_jax import metrics as metrics_lib
from vera_jax import train as train_lib
from vera_jax.models import common as model_common
from vera_jax.models import hub

METHODS = ("vera", "lora", "full", "head")


class CheckpointUnavailableError(RuntimeError):
    """The model checkpoint is neither a local directory, nor cached, nor downloadable."""


def resolve_checkpoint(name: str, timeout: float) -> str:
    """Local directory for `name`: itself, the Hub cache, or a download when the Hub is reachable."""
    if os.path.isdir(name):
        return name
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model.checkpoint: {name} is not a directory")
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (the next step says whether it can be fetched)
        pass
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else data_lib.glue.reachable(constants.ENDPOINT, timeout)
    if reason is not None:
        raise CheckpointUnavailableError(
            f"model.checkpoint {name!r} is not a local directory, not in the Hugging Face cache, and cannot be "
            f"downloaded ({reason}). Offline, pass a local checkpoint directory (config.json, model.safetensors, "
            f"tokenizer files), e.g. --config.model.checkpoint=/path/to/{name.split('/')[-1]}, and GLUE TSVs with "
            f"--config.data.dir=/path/to/glue (RTE/train.tsv, RTE/dev.tsv, ...).")
    return hub.resolve(name)


def _validate(config) -> None:
    if config.method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {config.method!r}")
    if config.num_train_steps > 0:
        raise ValueError("num_train_steps: GLUE runs are sized in epochs (num_epochs); leave num_train_steps at -1")


def attach(params, config) -> vera_jax.Adapted:
    """The method's adapter on `params`; the classifier head always trains (its own lr)."""
    head = tuple(config.model.head)
    if config.method == "vera":
        v = config.vera
        return vera_jax.apply_vera(params, vera_jax.VeraConfig(
            r=v.r, targets=tuple(v.targets), d_initial=v.d_initial, seed=config.seed, dropout=v.dropout,
            trainable_extra=head))
    if config.method == "lora":
        lo = config.lora
        return vera_jax.apply_lora(params, vera_jax.LoraConfig(
            r=lo.r, alpha=lo.alpha, targets=tuple(lo.targets), dropout=lo.dropout, seed=config.seed,
            trainable_extra=head))
    if config.method == "full":
        return vera_jax.apply_full(params, head)
    return vera_jax.apply_head(params, head)


def learning_rates(config) -> dict:
    """Peak lr per optimizer group: the adapter's (VeRA or LoRA), the head's, full fine-tuning's."""
    rates = {"head": config.lr.head, "full": config.lr.full}
    if config.method in ("vera", "lora"):
        rates["adapter"] = config.lr[config.method]
    return rates


def load_model(path: str, config, task: data_lib.GlueTask):
    """(model, params, tokenizer, hf_config) from a local checkpoint directory; a classifier the
    checkpoint lacks is drawn from config.seed, so seeds differ in the head's start as well."""
    hf_config = hub.read_config(path)
    model, params, tokenizer = hub.from_pretrained(path, num_labels=task.num_labels)
    if config.model.tokenizer:
        tokenizer = hub.load_tokenizer(config.model.tokenizer)
    if tokenizer is None:
        raise FileNotFoundError(f"model.checkpoint {path} has no tokenizer files ({', '.join(hub.TOKENIZER_FILES)}); "
                                "set model.tokenizer to a directory that has them")
    if not any(a.endswith("ForSequenceClassification") for a in hf_config.get("architectures") or ()):
        fresh = model_common.init_subtrees(model, hub.family(hf_config["model_type"]).dummy_inputs(hf_config),
                                           ["classifier"], config.seed)
        params = {**params, "classifier": jax.tree.map(jnp.asarray, fresh["classifier"])}
    return model, params, tokenizer, hf_config


def make_fns(model, task: data_lib.GlueTask):
    """(loss_fn, eval_fn, metrics_fn) for the trainer: cross-entropy, or MSE on one output (STS-B)."""

    def forward(params, batch, deterministic, rng=None):
        return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                           deterministic=deterministic, rngs=None if rng is None else {"dropout": rng})

    def loss_fn(params, batch, rng):
        out = forward(params, batch, False, jax.random.fold_in(rng, 0)).astype(jnp.float32)
        if task.regression:
            return jnp.mean((out[:, 0] - batch["label"]) ** 2), {}
        loss = optax.softmax_cross_entropy_with_integer_labels(out, batch["label"]).mean()
        return loss, {"accuracy": jnp.mean(out.argmax(-1) == batch["label"])}

    def eval_fn(params, batch):
        out = forward(params, batch, True).astype(jnp.float32)
        return {"prediction": out[:, 0] if task.regression else out.argmax(-1), "label": batch["label"]}

    def metrics_fn(outputs):
        return metrics_lib.compute(task.metrics, outputs["prediction"], outputs["label"])

    return loss_fn, eval_fn, metrics_fn


def build(config):
    """(trainer Task, info dict, trainer config): the trainer config is a copy of `config` with the
    derived fields set (num_train_steps from the epochs, an eval every epoch, the best metric and
    the per-group learning rates)."""
    _validate(config)
    config = config.copy_and_resolve_references()
    task = data_lib.get_task(config.data.task)
    checkpoint = resolve_checkpoint(config.model.checkpoint, config.network_timeout)
    d = config.data
    load = dict(data_dir=d.dir, tfds_data_dir=d.tfds_data_dir or None, download=d.download, timeout=config.network_timeout)
    train_split = data_lib.load_split(task, "train", limit=d.train_limit, **load)
    dev_split = data_lib.load_split(task, "dev", limit=d.eval_limit, **load)
    model, params, tokenizer, hf_config = load_model(checkpoint, config, task)
    max_length = min(d.max_length, hf_config.get("max_position_embeddings", d.max_length)
                     - (hf_config.get("pad_token_id", 0) + 1 if hf_config["model_type"] == "roberta" else 0))
    buckets = data_lib.bucket_lengths(max_length, tuple(d.buckets))
    train_enc = data_lib.tokenize(train_split, tokenizer, max_length)
    dev_enc = data_lib.tokenize(dev_split, tokenizer, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else hf_config.get("pad_token_id", 0)

    per_epoch = data_lib.steps_per_epoch(len(train_split), config.batch_size)
    config.num_train_steps = max(1, math.ceil(config.num_epochs * per_epoch))
    if config.eval_every_steps == 0:
        config.eval_every_steps = per_epoch
    if not config.best_metric:
        config.best_metric = task.best_metric
    for group, rate in learning_rates(config).items():
        config.optimizer.learning_rates[group] = rate

    train = data_lib.train_dataset(train_enc, train_split.labels, global_batch=config.batch_size,
                                   num_steps=config.num_train_steps, seed=config.seed, shuffle=config.shuffle,
                                   buckets=buckets, pad_id=pad_id, sort_window=d.sort_window,
                                   threads=config.data_threads, prefetch=config.data_prefetch)
    dev = data_lib.eval_dataset(dev_enc, dev_split.labels, eval_batch_size=config.eval_batch_size,
                                buckets=buckets, pad_id=pad_id)
    adapted = attach(params, config)
    dummy = hub.family(hf_config["model_type"]).dummy_inputs(hf_config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy))
    loss_fn, eval_fn, metrics_fn = make_fns(model, task)
    train_task = train_lib.Task(adapted=adapted, loss_fn=loss_fn, train_data=train, eval_data=dev, eval_fn=eval_fn,
                                metrics_fn=metrics_fn, param_axes=nn.get_partition_spec(boxed)["params"],
                                name=f"{task.name}-{config.method}", steps_per_epoch=per_epoch)
    info = {
        "task": task.name, "method": config.method, "checkpoint": config.model.checkpoint, "seed": config.seed,
        "train_examples": len(train_split), "dev_examples": len(dev_split), "train_source": train_split.source,
        "max_length": max_length, "buckets": list(buckets), "steps_per_epoch": per_epoch,
        "train_padding_fraction": data_lib.padding_fraction(train_enc, config.batch_size, buckets, seed=config.seed,
                                                            shuffle=config.shuffle, sort_window=d.sort_window),
        "adapter_params": int(sum(x.size for x in jax.tree.leaves(adapted.adapter))),
        "trainable_params": vera_jax.count_trainable(adapted),
    }
    return train_task, info, config


def _epoch_evals(workdir: str, per_epoch: int) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [{"epoch": r["step"] / per_epoch, "step": r["step"],
             **{k[len("eval/"):]: v for k, v in r.items() if k.startswith("eval/")}}
            for r in records if any(k.startswith("eval/") for k in r)]


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs one GLUE fine-tuning; returns (and writes to workdir/glue_summary.json) its summary."""
    start = time.time()
    task, info, config = build(config)
    result = train_lib.train_and_evaluate(config, workdir, task)
    per_epoch = info["steps_per_epoch"]
    best = result.summary["best"]
    summary = {
        **info,
        "epochs": config.num_train_steps / per_epoch,
        "steps": config.num_train_steps,
        "per_epoch_eval": _epoch_evals(workdir, per_epoch),
        "best": {"metric": best["metric"], "value": best["value"], "step": best["step"],
                 "epoch": None if best["step"] is None else best["step"] / per_epoch, "metrics": best["metrics"]},
        "final_eval": result.summary["final"]["eval"],
        "wall_time_s": time.time() - start,
        "train_time_s": result.summary["train_time_s"],
    }
    if config.save_adapter and jax.process_index() == 0:
        vera_jax.save_adapter(os.path.join(workdir, "adapter"), result.adapted)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "glue_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "GLUE config file (configs/roberta_*.py, configs/minilm_*.py)",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "output directory (default: /tmp/vera_glue/<task>-<method>-s<seed>)")


def main(argv) -> None:
    del argv
    config = FLAGS.config
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/roberta_large_rte.py")
    workdir = FLAGS.workdir or f"/tmp/vera_glue/{config.data.task}-{config.method}-s{config.seed}"
    train_lib.initialize_distributed(config)
    try:
        summary = train_and_evaluate(config, workdir)
    except (CheckpointUnavailableError, data_lib.DataUnavailableError, FileNotFoundError, data_lib.GlueDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    best = summary["best"]
    print(json.dumps({"task": summary["task"], "method": summary["method"], "best_epoch": best["epoch"],
                      **(best["metrics"] or {}), "trainable_params": summary["trainable_params"],
                      "wall_time_s": round(summary["wall_time_s"], 1), "workdir": workdir}))


if __name__ == "__main__":
    app.run(main)
