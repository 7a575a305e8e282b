"""What a family hands the trainer (Task, Eval) and what it gets back (TrainResult, the exits)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from vera_jax import adapters

PREEMPTED_EXIT_CODE = 143


class Preempted(SystemExit):
    """SIGTERM arrived; the current step was checkpointed. Exit status 143 (128 + SIGTERM)."""

    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step

    def __str__(self) -> str:
        return f"preempted by SIGTERM; checkpoint written at step {self.step}"


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm of optimizer step `step` (1-based) is not finite; nothing from that
    step was checkpointed."""

    def __init__(self, step: int, loss: float, grad_norm: float, last_checkpoint: Optional[int]):
        self.step, self.loss, self.grad_norm, self.last_checkpoint = step, loss, grad_norm, last_checkpoint
        super().__init__(f"non-finite loss at step {step} (loss={loss}, grad_norm={grad_norm}); "
                         f"training stopped, last good checkpoint: step {last_checkpoint}")


@dataclasses.dataclass
class Eval:
    """One named evaluation: its data, how to batch it, what to compute, and when.

    data: grain.MapDataset of single examples, batched in order (order it by length for little
        padding); the last batch is padded by repeating the final example, and those rows dropped.
    eval_fn(params, batch) -> dict of arrays with a leading batch axis (predictions, labels,
        generated tokens...), jitted on the same adapter path as training.
    metrics_fn(outputs) -> dict of floats, on the host, over the concatenated outputs of the set.
    every: when to run it: a step count, "epoch" (needs epochs: a MapDataset train_data or
        task.steps_per_epoch), "end" (only after the last step), or None for the config's
        `eval_every_steps` (0: every epoch). Every eval also runs after the last step.
    collate(examples, longest) -> batch, and lengths (one per example): as Task's, for this set;
        None takes the task's collate (default: stack) and no lengths.
    batch_size: global examples per eval step; None takes the config's `eval_batch_size`.
    write_fn(workdir, step, outputs, metrics): on process 0 after each run of this eval, e.g. to
        write the predictions it scored.
    on_adapted: eval_fn gets the `Adapted` tree itself instead of plain params, for functions
        that choose their own adapter path (e.g. `vera_jax.models.generate.beam_search`, which
        merges once per call rather than once per decoded token).
    """

    data: Any
    eval_fn: Callable
    metrics_fn: Callable
    every: Any = None
    collate: Optional[Callable] = None
    lengths: Any = None
    batch_size: Optional[int] = None
    write_fn: Optional[Callable] = None
    on_adapted: bool = False


@dataclasses.dataclass
class Task:
    """What a benchmark family plugs into the trainer.

    adapted: the model's params with an adapter attached (vera_jax.apply_vera / apply_lora / ...).
    loss_fn(params, batch, rng) -> (scalar loss, dict of scalar aux metrics); `params` are plain
        model params (merged W0 + delta, or the base params under factored interception).
    train_data: grain.MapDataset of single examples (the trainer shuffles and batches), or a
        grain.IterDataset yielding this process's batches (batch_size / process_count rows).
    collate(examples, longest) -> batch: turns this process's examples of one batch into arrays
        (e.g. pads token ids to a bucket); `longest` is the largest `train_lengths` value in the
        whole global batch (None without lengths), so every process pads alike. None stacks.
    train_lengths: one length per training example; with `sort_window` > 1 each window of that
        many batches is sorted by length before batching, and the batches then shuffled.
    evals: named evaluations ({"dev": Eval(...), ...}); the first one, or the one
        `config.best_metric` names as "name/metric", is tracked as best. Metrics are logged as
        "name/metric".
    eval_data / eval_fn / metrics_fn: shorthand for evals={"eval": Eval(eval_data, eval_fn,
        metrics_fn)}.
    param_axes: logical axis names of adapted.base (nn.get_partition_spec of the boxed params from
        model.init); None replicates every param.
    steps_per_epoch: global steps per pass over the data, for an IterDataset train_data (the
        trainer counts it itself for a MapDataset, and then this must be None). With it, epochs
        work as for a MapDataset: num_epochs sets the step count when num_train_steps is -1,
        eval_every_steps=0 evaluates once per epoch, and metrics and the summary carry epochs.
    """

    adapted: adapters.Adapted
    loss_fn: Callable
    train_data: Any
    eval_data: Any = None
    eval_fn: Optional[Callable] = None
    metrics_fn: Optional[Callable] = None
    param_axes: Any = None
    name: str = "task"
    steps_per_epoch: Optional[int] = None
    collate: Optional[Callable] = None
    train_lengths: Any = None
    sort_window: int = 0
    evals: dict = dataclasses.field(default_factory=dict)

    def all_evals(self) -> dict:
        """The named evals, with the eval_data shorthand as "eval"."""
        if self.eval_data is None:
            if self.eval_fn is not None or self.metrics_fn is not None:
                raise ValueError("task: eval_fn/metrics_fn given without eval_data")
            return dict(self.evals)
        if self.eval_fn is None or self.metrics_fn is None:
            raise ValueError("task: eval_data needs eval_fn and metrics_fn")
        if "eval" in self.evals:
            raise ValueError("task: eval_data is the eval named 'eval', which evals also defines")
        return {"eval": Eval(self.eval_data, self.eval_fn, self.metrics_fn), **self.evals}


@dataclasses.dataclass
class TrainResult:
    adapted: adapters.Adapted  # final params with trained adapter (global arrays)
    summary: dict
