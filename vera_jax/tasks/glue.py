"""The GLUE family (the paper's Table 2): sentence(-pair) classification and STS-B regression
on BERT/RoBERTa, data from tfds `glue/<task>` or local GLUE TSVs.

Batches are padded to the smallest bucket length that holds their longest example (a handful of
compiled shapes); with `data.sort_window` > 1 the trainer sorts windows of batches by length.
"""

from __future__ import annotations

import grain
import numpy as np

from vera_jax import data as data_lib
from vera_jax.train import Eval

from . import runner
from .classification import classifier_fns

ADVICE = "and GLUE TSVs with --config.data.dir=/path/to/glue (RTE/train.tsv, RTE/dev.tsv, ...)"


def load_data(config) -> dict:
    if config.num_train_steps > 0:
        raise runner.ConfigError("num_train_steps: GLUE runs are sized in epochs (num_epochs); leave it at -1")
    task = data_lib.get_task(config.data.task)
    d = config.data
    load = dict(data_dir=d.dir, tfds_data_dir=d.tfds_data_dir or None, download=d.download,
                timeout=config.network_timeout)
    return {"task": task, "train": data_lib.load_split(task, "train", limit=d.train_limit, **load),
            "dev": data_lib.load_split(task, "dev", limit=d.eval_limit, **load)}


def model_options(config, data) -> dict:
    return {"num_labels": data["task"].num_labels}


def examples(encoded: dict, labels: np.ndarray) -> list[dict]:
    """Single examples: ragged token ids and type ids, and the label (int32 class or float32 score)."""
    labels = labels.astype(np.int32 if np.issubdtype(labels.dtype, np.integer) else np.float32)
    return [{"input_ids": ids, "token_type_ids": types, "label": label}
            for ids, types, label in zip(encoded["input_ids"], encoded["token_type_ids"], labels)]


def make_parts(config, model: runner.Model, data) -> runner.Parts:
    task, d, hf = data["task"], config.data, model.hf_config
    if model.tokenizer is None:
        raise FileNotFoundError(f"model.checkpoint {model.path} has no tokenizer files; set model.tokenizer "
                                "to a directory that has them")
    reserved = hf.get("pad_token_id", 0) + 1 if hf["model_type"] == "roberta" else 0  # RoBERTa's position offset
    max_length = min(d.max_length, hf.get("max_position_embeddings", d.max_length) - reserved)
    buckets = data_lib.bucket_lengths(max_length, tuple(d.buckets))
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else hf.get("pad_token_id", 0)
    train_enc = data_lib.tokenize(data["train"], model.tokenizer, max_length)
    dev_enc = data_lib.tokenize(data["dev"], model.tokenizer, max_length)
    train_lens = np.asarray([len(x) for x in train_enc["input_ids"]])
    dev_lens = np.asarray([len(x) for x in dev_enc["input_ids"]])
    dev_order = np.argsort(dev_lens, kind="stable")
    dev = examples(dev_enc, data["dev"].labels)

    def collate(rows: list[dict], longest: int) -> dict:
        return data_lib.pad_rows(rows, data_lib.bucket_for(longest, buckets), pad_id)

    def forward(params, batch, deterministic, rng):
        return model.module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                  batch["token_type_ids"], deterministic=deterministic,
                                  rngs=None if rng is None else {"dropout": rng})

    loss_fn, eval_fn, metrics_fn = classifier_fns(forward, metrics=task.metrics, regression=task.regression)
    dev_eval = Eval(grain.MapDataset.source([dev[i] for i in dev_order]), eval_fn, metrics_fn,
                    lengths=dev_lens[dev_order])
    padding = data_lib.padding_fraction(train_lens, config.batch_size, buckets, seed=config.seed,
                                        shuffle=config.shuffle, sort_window=d.sort_window)
    info = {"task": task.name, "train_examples": len(data["train"]), "dev_examples": len(data["dev"]),
            "train_source": data["train"].source, "max_length": max_length, "buckets": list(buckets),
            "train_padding_fraction": padding}
    return runner.Parts(train=grain.MapDataset.source(examples(train_enc, data["train"].labels)), loss_fn=loss_fn,
                        evals={"eval": dev_eval}, collate=collate, train_lengths=train_lens,
                        sort_window=d.sort_window, best_metric=task.best_metric, info=info)


FAMILY = runner.Family(name="glue", load_data=load_data, model_options=model_options, make_parts=make_parts,
                       user_errors=(data_lib.GlueDataError,), advice=ADVICE,
                       run_name=lambda c: f"{c.data.task}-{c.method}-s{c.seed}")
