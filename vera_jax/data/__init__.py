"""Benchmark data pipelines: GLUE from tfds (data_source) or local TSVs, padded into a fixed set of
batch shapes for the trainer."""

from .batching import (
    bucket_for,
    bucket_lengths,
    epoch_order,
    eval_dataset,
    pad_rows,
    padding_fraction,
    steps_per_epoch,
    train_dataset,
)
from .glue import (
    TASKS,
    DataUnavailableError,
    GlueDataError,
    GlueTask,
    Split,
    get_task,
    load_split,
    read_local,
    read_tfds,
    read_tsv,
    tokenize,
)

__all__ = [
    "TASKS", "DataUnavailableError", "GlueDataError", "GlueTask", "Split", "bucket_for", "bucket_lengths",
    "epoch_order", "eval_dataset", "get_task", "load_split", "pad_rows", "padding_fraction", "read_local",
    "read_tfds", "read_tsv", "steps_per_epoch", "tokenize", "train_dataset",
]
