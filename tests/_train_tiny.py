"""A tiny VeRA classification task for the trainer tests, and a child-process entry point.

    python tests/_train_tiny.py '{"workdir": ..., "steps": 6, ...}'

runs train_and_evaluate in a fresh process (meshes of simulated devices, jax.distributed, kills)
and writes the final trainable leaves to <workdir>/final.npz.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

FEATURES, HIDDEN, CLASSES = 16, 32, 3
LAYERS = 3  # of the stacked model (3: a layer axis cannot pass for another axis, nor divide a mesh axis of 2)


def dense(features, name, axes):
    return nn.Dense(features, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


class Tiny(nn.Module):
    """x -> query -> tanh -> value -> tanh -> classifier, with logical axis names on every param."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(dense(HIDDEN, "query", ("embed", "mlp"))(x))
        h = jnp.tanh(dense(HIDDEN, "value", ("mlp", "embed"))(h))
        return dense(CLASSES, "classifier", ("embed", None))(h)


class Block(nn.Module):
    """One layer of the stacked model, (carry, x) -> (carry, None) as nn.scan wants it."""

    @nn.compact
    def __call__(self, h, _=None):
        h = h + jnp.tanh(dense(HIDDEN, "query", ("embed", "mlp"))(h))
        return h + jnp.tanh(dense(HIDDEN, "value", ("mlp", "embed"))(h)), None


class Stack(nn.Module):
    """x -> embed_in -> LAYERS blocks -> classifier; `scan`: the blocks under one nn.scan (params
    stacked on a leading axis named "layers"), else unrolled as `layers_0` ... (the twin)."""

    scan: bool = True

    @nn.compact
    def __call__(self, x):
        h = dense(HIDDEN, "embed_in", (None, "embed"))(x)
        if self.scan:
            blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            h, _ = blocks(name="layers")(h, None)
        else:
            for i in range(LAYERS):
                h, _ = Block(name=f"layers_{i}")(h)
        return dense(CLASSES, "classifier", ("embed", None))(h)


def _model(stack):
    """(module, params to attach to, logical axes): the Tiny model, or `Stack` "scanned" (params
    boxed: the adapter reads the layer axis from them) or "unrolled" (the scanned init, sliced)."""
    x = jnp.zeros((1, FEATURES))
    if stack is None:
        boxed = jax.jit(Tiny().init)(jax.random.PRNGKey(0), x)["params"]
        return Tiny(), boxed, nn.get_partition_spec(boxed)
    boxed = jax.jit(Stack().init)(jax.random.PRNGKey(0), x)["params"]
    if stack == "scanned":
        return Stack(), boxed, nn.get_partition_spec(boxed)
    plain = nn.unbox(boxed)
    params = {**{k: v for k, v in plain.items() if k != "layers"},
              **{f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], plain["layers"]) for i in range(LAYERS)}}
    axes = nn.get_partition_spec(jax.eval_shape(Stack(scan=False).init, jax.random.PRNGKey(0), x)["params"])
    return Stack(scan=False), params, axes


def examples(n: int, seed: int, nan_at: int | None = None) -> list[dict]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = (x[:, :CLASSES] * np.arange(1, CLASSES + 1)).argmax(-1).astype(np.int32)
    if nan_at is not None:
        x[nan_at] = np.nan
    return [{"x": x[i], "label": y[i]} for i in range(n)]


def make_task(*, n_train=64, n_eval=20, nan_at=None, on_load=None, iter_data=False, r=4, stack=None,
              quantize=None):
    """The tiny VeRA task; `stack`: "scanned" | "unrolled" trains `Stack` (its layers stacked by
    nn.scan, or its unrolled twin with the same weights) instead of `Tiny`; `quantize`: "int8" |
    "nf4" (block 16) keeps the base's kernels quantized (the classifier stays float)."""
    import vera_jax
    from vera_jax import quant
    from vera_jax.train import Task

    model, boxed, param_axes = _model(stack)
    if quantize:
        boxed = quant.quantize_params(boxed, quantize, block_size=16)
        param_axes = quant.quantized_axes(nn.unbox(boxed), param_axes)
    adapted = vera_jax.apply_vera(boxed, vera_jax.VeraConfig(r=r, targets=("query", "value"), d_initial=0.1,
                                                             seed=0, trainable_extra=("classifier",)))

    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["x"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}

    def eval_fn(params, batch):
        return {"pred": model.apply({"params": params}, batch["x"]).argmax(-1), "label": batch["label"]}

    def metrics_fn(out):
        return {"accuracy": float((out["pred"] == out["label"]).mean()), "n": float(len(out["label"]))}

    train = grain.MapDataset.source(examples(n_train, 1, nan_at))
    if on_load is not None:
        train = train.map(on_load)
    if iter_data:
        train = train.shuffle(seed=3).repeat().batch(8).to_iter_dataset(
            grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    return Task(adapted=adapted, loss_fn=loss_fn, train_data=train,
                eval_data=grain.MapDataset.source(examples(n_eval, 2)), eval_fn=eval_fn,
                metrics_fn=metrics_fn, param_axes=param_axes, name="tiny")


def tiny_config(steps: int = 6):
    from vera_jax.train import default_config

    c = default_config()
    c.num_train_steps = steps
    c.batch_size = 8
    c.eval_batch_size = 8
    c.optimizer.learning_rate = 1e-2
    c.optimizer.learning_rates.head = 5e-3
    c.optimizer.weight_decay = 0.01
    c.optimizer.warmup_steps = 2
    c.optimizer.grad_clip_norm = 1.0
    c.log_every_steps = 2
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 2
    c.best_metric = "accuracy"
    c.checkpoint_async = False
    c.tensorboard = False
    c.progress_bar = False
    c.data_threads = 1
    c.data_prefetch = 1
    return c


def flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): np.asarray(jax.device_get(v)) for k, v in leaves}


def signal_after(loads: int, signum: int, pause: float = 0.0):
    """An example map that sends `signum` to this process on the `loads`-th example it loads, then
    holds that load for `pause` seconds. Under jax.distributed the pause gives JAX's preemption sync
    protocol (notice -> coordination service -> barrier on every process's step) time to agree on a
    step before this tiny run could end: the agreed step is the fastest process's step + 1, and a run
    that finishes first ends normally (exit 0), which is right for a job but not what a test of the
    preemption path wants."""
    lock, count = threading.Lock(), [0]

    def on_load(example):
        with lock:
            count[0] += 1
            hit = count[0] == loads
        if hit:
            os.kill(os.getpid(), signum)
            time.sleep(pause)
        return example

    return on_load


def override(config, fields: dict):
    for key, value in fields.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def specs(tree) -> dict[str, list]:
    """keystr -> the PartitionSpec of each array's NamedSharding, as JSON (None, names, lists)."""
    return {jax.tree_util.keystr(k): [p if p is None or isinstance(p, str) else list(p) for p in v.sharding.spec]
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run(workdir: str, steps: int, fields: dict, on_load=None, **task_kwargs) -> dict:
    """Trains the tiny task; returns the summary and the final trainable leaves (also final.npz),
    and writes the final frozen base's and adapter's shardings to shardings.json."""
    import vera_jax
    from vera_jax.train import initialize_distributed, train_and_evaluate

    config = override(tiny_config(steps), fields)
    initialize_distributed(config)
    result = train_and_evaluate(config, workdir, make_task(on_load=on_load, **task_kwargs))
    trainable = flat(vera_jax.partition(result.adapted)[0])
    if jax.process_index() == 0:
        np.savez(os.path.join(workdir, "final.npz"), **trainable)
        with open(os.path.join(workdir, "shardings.json"), "w") as f:
            json.dump({"base": specs(result.adapted.base), "adapter": specs(result.adapted.adapter)}, f)
    return {"summary": result.summary, "trainable": trainable}


def raise_after(loads: int):
    """An example map that raises on the `loads`-th example (an in-process crash)."""
    count = [0]

    def on_load(example):
        count[0] += 1
        if count[0] == loads:
            raise RuntimeError(f"crash on load {loads}")
        return example

    return on_load


def main(args: dict) -> None:
    """args: workdir, steps, config (dotted field -> value), optional task (make_task's keywords),
    signal + signal_after (+ pause_after_signal seconds), or
    runs: [{"workdir", "config"}, ...] to train several configs in this process."""
    for one in args.get("runs", [args]):
        on_load = (signal_after(one["signal_after"], getattr(signal, one["signal"]), one.get("pause_after_signal", 0.0))
                   if "signal" in one else None)
        run(one["workdir"], one.get("steps", 6), one.get("config", {}), on_load, **one.get("task", {}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
