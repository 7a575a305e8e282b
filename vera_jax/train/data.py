"""Per-process batches from grain datasets, resumable from a checkpointed iterator state.

A family hands the trainer a `grain.MapDataset` of single examples (dicts of numpy arrays of equal
shapes) and the trainer owns shuffling and batching: batch `s` is a pure function of (seed, step),
so the iterator state is just the position. A family that needs its own pipeline (packing,
streaming) hands a `grain.IterDataset` yielding this process's batches instead; its iterator state
is checkpointed with grain's handler.
"""

from __future__ import annotations

import functools
from typing import Iterator

import grain
import jax
import numpy as np


def stack(examples: list) -> dict:
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *examples)


def steps_per_epoch(dataset, global_batch: int) -> int | None:
    """Full global batches per pass over a MapDataset (the remainder is dropped, a different one
    each epoch when shuffling); None for an IterDataset."""
    if not isinstance(dataset, grain.MapDataset):
        return None
    steps = len(dataset) // global_batch
    if steps == 0:
        raise ValueError(f"train_data: {len(dataset)} examples is less than batch_size {global_batch}")
    return steps


def train_iterator(dataset, *, global_batch: int, num_steps: int, seed: int, shuffle: bool,
                   threads: int, prefetch: int) -> Iterator[dict]:
    """Iterator over this process's rows of each global batch, steps 0..num_steps-1."""
    if isinstance(dataset, grain.IterDataset):
        return iter(dataset)
    if not isinstance(dataset, grain.MapDataset):
        raise TypeError("train_data: expected a grain.MapDataset or grain.IterDataset, "
                        f"got {type(dataset).__name__}")
    n = len(dataset)
    per_epoch = steps_per_epoch(dataset, global_batch)
    local = _local_rows(global_batch)
    start = jax.process_index() * local

    @functools.lru_cache(maxsize=2)
    def order(epoch: int) -> np.ndarray:
        if not shuffle:
            return np.arange(n)
        return np.random.default_rng([seed, epoch]).permutation(n)

    def load(step: int) -> dict:
        epoch, k = divmod(int(step), per_epoch)
        rows = order(epoch)[k * global_batch + start: k * global_batch + start + local]
        return stack([dataset[int(i)] for i in rows])

    steps = grain.MapDataset.range(num_steps).map(load)
    return iter(steps.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))


def _local_rows(global_batch: int) -> int:
    n = jax.process_count()
    if global_batch % n:
        raise ValueError(f"batch size {global_batch} not divisible by {n} processes")
    return global_batch // n


def eval_batches(dataset, global_batch: int, threads: int):
    """Yields (this process's rows, number of real rows in the global batch); the last global
    batch is padded by repeating the final example, and those rows are dropped by the caller."""
    if not isinstance(dataset, grain.MapDataset):
        raise TypeError(f"eval_data: expected a grain.MapDataset, got {type(dataset).__name__}")
    n = len(dataset)
    local = _local_rows(global_batch)
    start = jax.process_index() * local

    def load(b: int):
        rows = np.minimum(np.arange(b * global_batch, (b + 1) * global_batch), n - 1)[start:start + local]
        return stack([dataset[int(i)] for i in rows]), min(global_batch, n - b * global_batch)

    batches = grain.MapDataset.range(-(-n // global_batch)).map(load)
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)))
