"""The vera_jax rows: the frozen model's forward + backward (the floor) and one training step per
method, the trainer's own step (`vera_jax.train`), on random weights of one shape.

  floor          frozen model, forward + backward to the token embeddings' output only (a zero
                 tensor added there through `nn.intercept_methods`; no weight gradient)
  vera_merged    VeRA with the trainer's adapter_path="merged"; vera_factored / vera_auto likewise
  lora           LoRA r=lora_r, alpha = r, adapter_path="auto"
  full           full fine-tuning (`apply_full`, every leaf trained)

Adapters target query and value and train their vectors only (no head). Each step is the body
`train_and_evaluate` jits (value_and_grad over the trainable part, `make_optimizer`'s AdamW at a
constant lr, the step's metrics), jitted here with the train state donated. Dropout is off.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

import vera_jax
from vera_jax import train
from vera_jax.models import hub
from vera_jax.train import make_train_step

from .shapes import FAMILY, cross_entropy, hidden_size, make_batch
from .timing import measure

METHODS = ("floor", "vera_merged", "vera_factored", "vera_auto", "lora", "full")
PATHS = {"vera_merged": "merged", "vera_factored": "factored", "vera_auto": "auto", "lora": "auto", "full": "merged"}
TARGETS = ("query", "value")
LEARNING_RATE = 1e-4


def floor_loss(model: nn.Module, embed_name: str) -> Callable:
    """`loss(params, eps, ids, labels)`: the model with `eps` added to its embedding's output."""

    def loss(params, eps, ids, labels):
        def add_eps(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            module = context.module
            if context.method_name == "__call__" and module.scope and tuple(module.scope.path) == (embed_name,):
                out = out + eps.astype(out.dtype)
            return out

        with nn.intercept_methods(add_eps):
            return cross_entropy(model.apply({"params": params}, ids), labels)

    return loss


def adapted_for(method: str, params: dict, vera_r: int, lora_r: int) -> vera_jax.Adapted:
    if method.startswith("vera_"):
        return vera_jax.apply_vera(params, vera_jax.VeraConfig(r=vera_r, targets=TARGETS))
    if method == "lora":
        return vera_jax.apply_lora(params, vera_jax.LoraConfig(r=lora_r, alpha=lora_r, targets=TARGETS))
    if method == "full":
        return vera_jax.apply_full(params, trainable_extra=())
    raise ValueError(f"methods: unknown method {method!r}; known: {list(METHODS)}")


def trainer_step(model: nn.Module, adapted: vera_jax.Adapted, path: str, dtype: str):
    """(step, state, frozen): the trainer's step `(state, frozen, batch) -> (state, metrics)` for
    `adapted` on batches {"ids", "labels"}, and its initial state."""
    config = train.default_config()
    config.adapter_path = path
    config.compute_dtype = dtype
    config.optimizer.learning_rate = LEARNING_RATE
    config.optimizer.schedule = "constant"

    def loss_fn(params, batch, rng):
        return cross_entropy(model.apply({"params": params}, batch["ids"]), batch["labels"]), {}

    task = train.Task(adapted=adapted, loss_fn=loss_fn, train_data=None)
    tx, schedules = train.make_optimizer(config.optimizer, vera_jax.optax_labels(adapted), total_steps=1)
    mesh = train.make_mesh(config.mesh)
    step = make_train_step(task, config, tx, schedules, mesh, tuple(config.mesh.batch_axes))
    trainable, frozen = vera_jax.partition(adapted)
    trainable = jax.tree.map(jnp.copy, trainable)  # donated with the state; keep the caller's params alive
    state = train.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                             rng=jax.random.PRNGKey(0))
    return step, state, frozen


def run_jax(cfg: dict, methods: list[str], batch: int, seq: int, iters: int, warmup: int, vera_r: int,
            lora_r: int, dtype: str) -> dict:
    """Every requested vera_jax method on one shape; keys are method names."""
    kind = cfg["model_type"]
    jdtype = jnp.dtype(dtype)
    model = hub.family(kind).build(cfg, dtype=jdtype, param_dtype=jdtype)
    ids, labels = make_batch(cfg, batch, seq)
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), ids[:1, :2]))["params"])()
    results = {}
    for method in methods:
        if method == "floor":
            eps = jnp.zeros((batch, seq, hidden_size(cfg)), jdtype)
            grad = jax.value_and_grad(floor_loss(model, FAMILY[kind][0]), argnums=1)
            res = {**measure(grad, (params, eps, ids, labels), iters, warmup), "trainable": 0}
        else:
            adapted = adapted_for(method, params, vera_r, lora_r)
            step, state, frozen = trainer_step(model, adapted, PATHS[method], dtype)
            res = measure(step, (state, frozen, {"ids": ids, "labels": labels}), iters, warmup, donate=(0,), carry=1)
            res["trainable"] = vera_jax.count_trainable(adapted)
        results[method] = res
    return results
