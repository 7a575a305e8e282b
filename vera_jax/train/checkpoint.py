"""Adapter-only orbax checkpoints: trainable leaves, optimizer state, step, RNG, data position.

Each save is atomic (orbax writes a temporary directory and renames it when complete). A
checkpoint that cannot be read back is reported, moved to workdir/corrupt_checkpoints, and the
previous one is used.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import time

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose train state does not match this run's (e.g. another adapter rank)."""


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager with three items: state (pytree), meta (JSON of
    host-side loop state: best metrics, log accumulators), data (grain iterator state)."""

    def __init__(self, directory: str, *, keep: int, use_async: bool):
        self.directory = os.path.abspath(directory)
        self._keep, self._async = keep, use_async
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                               enable_async_checkpointing=self._async,
                                               cleanup_tmp_directories=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler()}
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, state, meta: dict, data_iterator) -> None:
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
            data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore_latest(self, abstract_state, data_iterator):
        """(state, meta) from the newest readable checkpoint (data_iterator is set in place), or
        None when there is none. A readable checkpoint of a different train state (another
        adapter config) raises instead of being skipped."""
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                self._check_shapes(step, abstract_state)
                out = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore(),
                    data=grain.checkpoint.CheckpointRestore(data_iterator)))
                return out["state"], out["meta"]
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means this checkpoint is unusable
                logging.error("checkpoint at step %d in %s is unreadable (%s: %s); using the previous one",
                              step, self.directory, type(e).__name__, str(e).splitlines()[0][:300])
                self._quarantine(step)
        return None

    def _check_shapes(self, step: int, abstract_state) -> None:
        stored = jax.tree.leaves(self._manager.item_metadata(step)["state"].tree)
        key = lambda x: (tuple(x.shape), str(x.dtype))  # noqa: E731
        want = collections.Counter(map(key, jax.tree.leaves(abstract_state)))
        have = collections.Counter(map(key, stored))
        if want != have:
            raise CheckpointMismatchError(
                f"checkpoint at step {step} in {self.directory} holds a different train state "
                f"(leaves (shape, dtype) only in checkpoint: {sorted((have - want).elements())[:5]}, "
                f"only in this run: {sorted((want - have).elements())[:5]}); use a new workdir or resume=False")

    def _quarantine(self, step: int) -> None:
        """Moves an unreadable step out of the manager's directory so later saves can reuse it."""
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints",
                               f"{step}-{int(time.time())}")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.move(src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self._manager.reload()

    def latest_step(self):
        return self._manager.latest_step()

    def close(self) -> None:
        self._manager.close()
