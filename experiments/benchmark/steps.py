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

The arithmetic minimum of a method's step is the floor's FLOPs (XLA's count of the floor
program) plus what the cost model (`vera_jax.adapters.cost.layer_costs`) says each adapted layer
adds on the path that step takes (auto: the path the cost model picks per layer; a quantized
layer: factored). The floor back-propagates to the embeddings, which an adapter on the first
layer does not need (the first layer's input gradients, ~1/layers of the floor's backward), so
at few layers the minimum is a slight over-estimate.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

import vera_jax
from vera_jax import quant, train
from vera_jax.adapters import cost
from vera_jax.adapters.factored import layer_path
from vera_jax.models import loader
from vera_jax.train import make_train_step

from .shapes import FAMILY, cross_entropy, hidden_size, make_batch
from .timing import count_all, measure_all

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


def extra_flops(adapted: vera_jax.Adapted, path: str, tokens: int) -> float | None:
    """FLOPs (2 x multiply-adds) the cost model says the adapter adds to the floor's step on
    `path`, with `tokens` rows through every adapted layer; None for methods it does not model."""
    if not adapted.layers or vera_jax.get_method(adapted.method).cost is None:
        return None
    quantized = quant.quantized_paths(adapted.base)
    total = 0
    for spec in adapted.layers:
        chosen = layer_path(adapted, spec, tokens, path, quantized=quantized)
        total += cost.layer_costs(tokens, spec.in_features, spec.out_features, adapted.config.r, adapted.method)[chosen]
    return 2.0 * total


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

    def init(trainable):
        trainable = jax.tree.map(jnp.copy, trainable)  # donated with the state; keep the caller's params alive
        return train.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                                rng=jax.random.PRNGKey(0))

    abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(trainable))
    return step, jax.eval_shape(init, trainable) if abstract else init(trainable), frozen


def run_jax(cfg: dict, methods: list[str], batch: int, seq: int, iters: int, warmup: int, vera_r: int,
            lora_r: int, dtype: str, count_only: bool = False) -> dict:
    """Every requested vera_jax method on one shape; keys are method names. count_only: XLA's FLOP
    counts only, on abstract weights (no memory, no run: a GPU run's shapes counted on a CPU)."""
    kind = cfg["model_type"]
    jdtype = jnp.dtype(dtype)
    loaded = loader.random_model(cfg, dtype=dtype, abstract=count_only)
    model, params = loaded.module, loaded.params
    ids, labels = make_batch(cfg, batch, seq)
    entries, trainable = {}, {}
    for method in methods:
        if method == "floor":
            eps = jnp.zeros((batch, seq, hidden_size(cfg)), jdtype)
            grad = jax.value_and_grad(floor_loss(model, FAMILY[kind][0]), argnums=1)
            entries[method], trainable[method] = (grad, (params, eps, ids, labels), (), 0), (0, None)
        else:
            adapted = adapted_for(method, params, vera_r, lora_r)
            step, state, frozen = trainer_step(model, adapted, PATHS[method], dtype)
            entries[method] = (step, (state, frozen, {"ids": ids, "labels": labels}), (0,), 1)
            trainable[method] = (vera_jax.count_trainable(adapted), extra_flops(adapted, PATHS[method], batch * seq))
    results = count_all(entries) if count_only else measure_all(entries, iters, warmup)
    for method, (count, extra) in trainable.items():
        results[method]["trainable"] = count
        results[method]["extra_flops_min"] = 0.0 if method == "floor" else extra
    return results
