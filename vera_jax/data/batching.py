"""Padded batches of ragged token ids with a fixed set of shapes, for `vera_jax.train`.

A batch is padded to the smallest bucket length that holds its longest example, so jit compiles
once per bucket (a handful of shapes) rather than once per batch, and short batches do not pay for
`max_length`. Training batches are a pure function of (seed, step): epoch e visits a permutation
seeded by (seed, e); with `sort_window` > 1, each window of that many batches is sorted by length
before batching (less padding) and the epoch's batches are then shuffled, so batch order stays
random. The training stream is a `grain.IterDataset` over steps, whose iterator state (the
position) the trainer checkpoints.
"""

from __future__ import annotations

import functools
from typing import Sequence

import grain
import jax
import numpy as np


def bucket_lengths(max_length: int, buckets: Sequence[int] = ()) -> tuple[int, ...]:
    """Sorted bucket lengths: those of `buckets` below `max_length`, then `max_length` itself."""
    if max_length < 2:
        raise ValueError(f"data.max_length: must be >= 2, got {max_length}")
    bad = [b for b in buckets if int(b) < 1]
    if bad:
        raise ValueError(f"data.buckets: lengths must be positive, got {bad}")
    return tuple(sorted({int(b) for b in buckets if int(b) < max_length} | {int(max_length)}))


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    i = int(np.searchsorted(buckets, length))
    if i == len(buckets):
        raise ValueError(f"example of {length} tokens is longer than the largest bucket {buckets[-1]}")
    return buckets[i]


def pad_rows(encoded: dict, labels: np.ndarray, rows: np.ndarray, length: int, pad_id: int) -> dict:
    """{"input_ids", "attention_mask", "token_type_ids": (len(rows), length) int32, "label": int32
    class ids or float32 scores}."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    types = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for j, i in enumerate(rows):
        n = len(encoded["input_ids"][i])
        ids[j, :n] = encoded["input_ids"][i]
        types[j, :n] = encoded["token_type_ids"][i]
        mask[j, :n] = 1
    label = labels[rows]
    label = label.astype(np.int32 if np.issubdtype(label.dtype, np.integer) else np.float32)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "label": label}


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full batches per epoch (the remainder is dropped, a different one each shuffled epoch)."""
    steps = num_examples // global_batch
    if steps == 0:
        raise ValueError(f"train split: {num_examples} examples is less than batch_size {global_batch}")
    return steps


def epoch_order(lengths: np.ndarray, *, global_batch: int, epoch: int, seed: int, shuffle: bool,
                sort_window: int) -> np.ndarray:
    """(steps_per_epoch, global_batch) example indices of one epoch's batches."""
    n = len(lengths)
    per_epoch = steps_per_epoch(n, global_batch)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    batches = order[: per_epoch * global_batch].reshape(per_epoch, global_batch)
    if sort_window > 1:
        windows = []
        for s in range(0, per_epoch, sort_window):
            w = batches[s: s + sort_window].reshape(-1)
            windows.append(w[np.argsort(lengths[w], kind="stable")].reshape(-1, global_batch))
        batches = np.concatenate(windows)
        if shuffle:
            batches = batches[np.random.default_rng([seed, epoch, 1]).permutation(per_epoch)]
    return batches


def _local_slice(global_batch: int) -> slice:
    count = jax.process_count()
    if global_batch % count:
        raise ValueError(f"batch size {global_batch} not divisible by {count} processes")
    local = global_batch // count
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def train_dataset(encoded: dict, labels: np.ndarray, *, global_batch: int, num_steps: int, seed: int,
                  shuffle: bool, buckets: tuple[int, ...], pad_id: int, sort_window: int = 0,
                  threads: int = 2, prefetch: int = 4) -> grain.IterDataset:
    """This process's rows of the padded global batches of steps 0..num_steps-1."""
    lens = np.asarray([len(x) for x in encoded["input_ids"]])
    per_epoch = steps_per_epoch(len(lens), global_batch)
    rows_of_process = _local_slice(global_batch)
    bucket_for(int(lens.max()), buckets)

    @functools.lru_cache(maxsize=2)
    def order(epoch: int) -> np.ndarray:
        return epoch_order(lens, global_batch=global_batch, epoch=epoch, seed=seed, shuffle=shuffle,
                           sort_window=sort_window)

    def load(step: int) -> dict:
        epoch, k = divmod(int(step), per_epoch)
        rows = order(epoch)[k]
        return pad_rows(encoded, labels, rows[rows_of_process], bucket_for(int(lens[rows].max()), buckets), pad_id)

    steps = grain.MapDataset.range(num_steps).map(load)
    return steps.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))


def eval_dataset(encoded: dict, labels: np.ndarray, *, eval_batch_size: int, buckets: tuple[int, ...],
                 pad_id: int) -> grain.MapDataset:
    """Single examples, sorted by length and padded to the bucket of their eval batch.

    The trainer stacks examples [b * eval_batch_size, (b + 1) * eval_batch_size) into eval batch b
    (and repeats the final example to fill the last one), so every batch has one shape from
    `buckets` and holds examples of similar length. Metrics do not depend on the order: eval
    outputs carry their labels."""
    lens = np.asarray([len(x) for x in encoded["input_ids"]])
    order = np.argsort(lens, kind="stable")
    examples = []
    for b in range(0, len(order), eval_batch_size):
        rows = order[b: b + eval_batch_size]
        batch = pad_rows(encoded, labels, rows, bucket_for(int(lens[rows].max()), buckets), pad_id)
        examples.extend({k: v[j] for k, v in batch.items()} for j in range(len(rows)))
    return grain.MapDataset.source(examples)


def padding_fraction(encoded: dict, global_batch: int, buckets: tuple[int, ...], **order_kwargs) -> float:
    """Fraction of padded positions over one training epoch (to report what bucketing saves)."""
    lens = np.asarray([len(x) for x in encoded["input_ids"]])
    batches = epoch_order(lens, global_batch=global_batch, epoch=0, **order_kwargs)
    padded = sum(bucket_for(int(lens[b].max()), buckets) * len(b) for b in batches)
    return 1.0 - float(lens[batches].sum()) / padded
