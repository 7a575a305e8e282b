"""Per-process batches from grain datasets, resumable from a checkpointed iterator state.

A family hands the trainer a `grain.MapDataset` of single examples and, optionally, a `collate`
step and per-example `lengths`; the trainer owns shuffling and batching: batch `s` is a pure
function of (seed, step), so the iterator state is just the position. With `lengths` and
`sort_window` > 1, each window of that many batches is sorted by length before batching (less
padding) and the epoch's batches are then shuffled, so batch order stays random. `collate`
turns this process's examples of one batch into arrays; it is told the longest `lengths` value
of the whole global batch, so every process pads to the same shape. A family that needs its own
pipeline (packing, streaming) hands a `grain.IterDataset` yielding this process's batches
instead; its iterator state is checkpointed with grain's handler.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Optional

import grain
import jax
import numpy as np

from vera_jax.data.batching import epoch_order, full_batches


def stack(examples: list, longest: Optional[int] = None) -> dict:
    """The default collate: examples of equal shapes stacked on a new batch axis."""
    del longest
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *examples)


def steps_per_epoch(dataset, global_batch: int) -> int | None:
    """Full global batches per pass over a MapDataset (the remainder is dropped, a different one
    each epoch when shuffling); None for an IterDataset."""
    if not isinstance(dataset, grain.MapDataset):
        return None
    return full_batches(len(dataset), global_batch)


def _check_lengths(lengths, n: int, field: str) -> Optional[np.ndarray]:
    if lengths is None:
        return None
    lengths = np.asarray(lengths)
    if lengths.shape != (n,):
        raise ValueError(f"{field}: expected one length per example ({n}), got shape {lengths.shape}")
    return lengths


def train_iterator(dataset, *, global_batch: int, num_steps: int, seed: int, shuffle: bool,
                   threads: int, prefetch: int, collate: Optional[Callable] = None,
                   lengths=None, sort_window: int = 0) -> Iterator[dict]:
    """Iterator over this process's rows of each global batch, steps 0..num_steps-1."""
    if isinstance(dataset, grain.IterDataset):
        return iter(dataset)
    if not isinstance(dataset, grain.MapDataset):
        raise TypeError("train_data: expected a grain.MapDataset or grain.IterDataset, "
                        f"got {type(dataset).__name__}")
    n = len(dataset)
    collate = collate or stack
    lengths = _check_lengths(lengths, n, "train_lengths")
    per_epoch = steps_per_epoch(dataset, global_batch)
    rows_of_process = _local_slice(global_batch)

    @functools.lru_cache(maxsize=2)
    def order(epoch: int) -> np.ndarray:
        return epoch_order(n, global_batch=global_batch, epoch=epoch, seed=seed, shuffle=shuffle,
                           lengths=lengths, sort_window=sort_window)

    def load(step: int) -> dict:
        epoch, k = divmod(int(step), per_epoch)
        rows = order(epoch)[k]
        longest = None if lengths is None else int(lengths[rows].max())
        return collate([dataset[int(i)] for i in rows[rows_of_process]], longest)

    steps = grain.MapDataset.range(num_steps).map(load)
    return iter(steps.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))


def _local_slice(global_batch: int) -> slice:
    count = jax.process_count()
    if global_batch % count:
        raise ValueError(f"batch size {global_batch} not divisible by {count} processes")
    local = global_batch // count
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def eval_batches(dataset, global_batch: int, threads: int, *, collate: Optional[Callable] = None, lengths=None):
    """Yields (this process's rows, number of real rows in the global batch) over examples in
    dataset order; the last global batch is padded by repeating the final example, and those rows
    are dropped by the caller. Order an eval set by length to get little padding."""
    if not isinstance(dataset, grain.MapDataset):
        raise TypeError(f"eval data: expected a grain.MapDataset, got {type(dataset).__name__}")
    n = len(dataset)
    collate = collate or stack
    lengths = _check_lengths(lengths, n, "eval lengths")
    local = _local_slice(global_batch)

    def load(b: int):
        rows = np.minimum(np.arange(b * global_batch, (b + 1) * global_batch), n - 1)
        longest = None if lengths is None else int(lengths[rows].max())
        return collate([dataset[int(i)] for i in rows[local]], longest), min(global_batch, n - b * global_batch)

    batches = grain.MapDataset.range(-(-n // global_batch)).map(load)
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)))
