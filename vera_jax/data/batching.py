"""Padding ragged token ids into a fixed set of batch shapes (buckets).

A batch is padded to the smallest bucket length that holds its longest example, so jit compiles
once per bucket (a handful of shapes) rather than once per batch, and short batches do not pay for
`max_length`. `epoch_order` says which examples form each batch of an epoch (the trainer's order,
here so data helpers can ask it without importing the trainer).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def full_batches(n: int, global_batch: int) -> int:
    """Full global batches in `n` examples (the remainder is dropped); at least one."""
    steps = n // global_batch
    if steps == 0:
        raise ValueError(f"train_data: {n} examples is less than batch_size {global_batch}")
    return steps


def epoch_order(n: int, *, global_batch: int, epoch: int, seed: int, shuffle: bool,
                lengths: Optional[np.ndarray] = None, sort_window: int = 0) -> np.ndarray:
    """(steps_per_epoch, global_batch) example indices of one epoch's batches."""
    per_epoch = full_batches(n, global_batch)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    batches = order[: per_epoch * global_batch].reshape(per_epoch, global_batch)
    if lengths is not None and sort_window > 1:
        windows = []
        for s in range(0, per_epoch, sort_window):
            w = batches[s: s + sort_window].reshape(-1)
            windows.append(w[np.argsort(lengths[w], kind="stable")].reshape(-1, global_batch))
        batches = np.concatenate(windows)
        if shuffle:
            batches = batches[np.random.default_rng([seed, epoch, 1]).permutation(per_epoch)]
    return batches


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


def pad_rows(rows: Sequence[dict], length: int, pad_id: int) -> dict:
    """Examples {"input_ids", "token_type_ids" (ragged), "label"} as a batch: "input_ids",
    "attention_mask", "token_type_ids" (len(rows), length) int32 and the stacked labels."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    types = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for j, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[j, :n] = row["input_ids"]
        types[j, :n] = row["token_type_ids"]
        mask[j, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "label": np.stack([np.asarray(row["label"]) for row in rows])}


def padding_fraction(lengths: np.ndarray, global_batch: int, buckets: tuple[int, ...], **order_kwargs) -> float:
    """Fraction of padded positions over one training epoch (to report what bucketing saves)."""
    lengths = np.asarray(lengths)
    batches = epoch_order(len(lengths), global_batch=global_batch, epoch=0, lengths=lengths, **order_kwargs)
    padded = sum(bucket_for(int(lengths[b].max()), buckets) * len(b) for b in batches)
    return 1.0 - float(lengths[batches].sum()) / padded
