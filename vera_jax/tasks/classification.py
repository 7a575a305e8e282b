"""Loss, eval and metrics of a classifier (or a one-output regressor), shared by every family
whose model ends in a classification head (GLUE, image classification)."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from vera_jax import metrics as metrics_lib


def classifier_fns(forward: Callable, *, metrics: Sequence[str], regression: bool = False):
    """(loss_fn, eval_fn, metrics_fn) for the trainer.

    forward(params, batch, deterministic, rng) -> (batch, num_labels) outputs; batch["label"] holds
    class ids, or float targets when `regression` (MSE on output 0, as STS-B). `metrics` are names
    in `vera_jax.metrics.METRICS` computed over the whole eval set.
    """

    def loss_fn(params, batch, rng):
        out = forward(params, batch, False, jax.random.fold_in(rng, 0)).astype(jnp.float32)
        if regression:
            return jnp.mean((out[:, 0] - batch["label"]) ** 2), {}
        loss = optax.softmax_cross_entropy_with_integer_labels(out, batch["label"]).mean()
        return loss, {"accuracy": jnp.mean(out.argmax(-1) == batch["label"])}

    def eval_fn(params, batch):
        out = forward(params, batch, True, None).astype(jnp.float32)
        return {"prediction": out[:, 0] if regression else out.argmax(-1), "label": batch["label"]}

    def metrics_fn(outputs):
        return metrics_lib.compute(tuple(metrics), outputs["prediction"], outputs["label"])

    return loss_fn, eval_fn, metrics_fn
