"""The one trainer: sharded jit train/eval steps over (trainable, frozen) adapter trees, optimizer
groups, exact resume from orbax checkpoints, metrics and a run summary.

    task = Task(adapted=vera_jax.apply_vera(params, vcfg), loss_fn=..., train_data=...,
                eval_data=..., eval_fn=..., metrics_fn=..., param_axes=nn.get_partition_spec(boxed))
    result = train_and_evaluate(config, workdir, task)

Exits: `Preempted` (a SystemExit, exit status 143) after SIGTERM once a checkpoint of the current
step is written; `NonFiniteLossError` (a FloatingPointError, exit status 1 when uncaught) when the
loss or gradient norm of a step is NaN/inf, before that step is checkpointed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from vera_jax import adapters, quant

from . import data as data_lib
from . import mesh as mesh_lib
from .checkpoint import Checkpointer
from .metrics import Best, MetricWriter
from .optim import make_optimizer
from .task import PREEMPTED_EXIT_CODE, Eval, NonFiniteLossError, Preempted, Task, TrainResult

__all__ = ["PREEMPTED_EXIT_CODE", "Eval", "NonFiniteLossError", "Preempted", "Task", "TrainResult",
           "TrainState", "call_model_fn", "make_train_step", "train_and_evaluate"]


@struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


def _is_none(x) -> bool:
    return x is None


def cast_params(tree, dtype):
    """Floating leaves cast to the compute dtype. A quantized kernel keeps its codes and scales as
    stored (casting a GGUF float16 scale or an NF4 second-level scale would change the weights)
    and dequantizes straight to `dtype`, so a bfloat16 step on a 4-bit base runs bfloat16 matmuls."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        if quant.is_quantized(x):
            return x.replace(dtype_name=dtype.name) if jnp.issubdtype(x.dtype, jnp.floating) else x
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree, is_leaf=quant.is_quantized)


def call_model_fn(fn: Callable, adapted: adapters.Adapted, config, *args, dropout_rng=None, train: bool = True):
    """fn(params, *args) on the adapted model by `config.adapter_path` (merged | factored | auto,
    see `adapters.call_adapted`), params cast to `config.compute_dtype`."""
    dtype = jnp.dtype(config.compute_dtype)
    return adapters.call_adapted(fn, adapted, *args, path=config.adapter_path, train=train,
                                 dropout_rng=dropout_rng, params_transform=lambda p: cast_params(p, dtype),
                                 compute_dtype=dtype)


def _total_steps(config, per_epoch: Optional[int]) -> int:
    if config.num_train_steps >= 0:
        return int(config.num_train_steps)
    if per_epoch is None:
        raise ValueError("num_train_steps: must be >= 0 when train_data is a grain.IterDataset "
                         "and the task gives no steps_per_epoch")
    return max(1, int(math.ceil(config.num_epochs * per_epoch)))


def _steps_per_epoch(task: Task, global_batch: int) -> Optional[int]:
    counted = data_lib.steps_per_epoch(task.train_data, global_batch)
    given = task.steps_per_epoch
    if given is None:
        return counted
    if counted is not None:
        raise ValueError(f"task.steps_per_epoch: only for an IterDataset train_data; this MapDataset "
                         f"has {counted} steps per epoch at batch_size {global_batch}, leave it None")
    if isinstance(given, bool) or not isinstance(given, (int, np.integer)) or given < 1:
        raise ValueError(f"task.steps_per_epoch: must be an int >= 1 or None, got {given!r}")
    return int(given)


def _eval_due(every, default_every: int, step: int, per_epoch: Optional[int], name: str) -> bool:
    """Whether an eval scheduled by `every` (steps, "epoch", "end", None) runs after `step`."""
    if every is None:
        every = default_every if default_every > 0 else "epoch"
    if every == "end":
        return False
    if every == "epoch":
        if per_epoch is None:
            raise ValueError(f"evals[{name!r}].every: 'epoch' needs epochs (a MapDataset train_data or "
                             "task.steps_per_epoch); give a step count or 'end'")
        return step % per_epoch == 0
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"evals[{name!r}].every: expected a step count >= 1, 'epoch', 'end' or None, got {every!r}")
    return step % int(every) == 0


def _best_target(best_metric: str, evals: dict) -> tuple[Optional[str], str]:
    """(eval name, metric) that `best_metric` ("name/metric", "metric" or "") tracks."""
    if not evals:
        return None, best_metric
    name, sep, metric = best_metric.rpartition("/")
    if not sep:
        return next(iter(evals)), best_metric
    if name not in evals:
        raise ValueError(f"best_metric: {best_metric!r} names eval {name!r}; the evals are {sorted(evals)}")
    return name, metric


def _validate(config, task: Task) -> None:
    if config.adapter_path not in ("merged", "factored", "auto"):
        raise ValueError(f"adapter_path: expected merged|factored|auto, got {config.adapter_path!r}")
    if getattr(task.adapted.config, "dropout", 0.0) and config.adapter_path == "merged":
        raise ValueError("adapter dropout > 0 acts on the adapter input, which the merged path never sees; "
                         "set adapter_path='factored' or dropout=0")
    if config.batch_size % config.grad_accum_steps:
        raise ValueError(f"batch_size {config.batch_size} not divisible by "
                         f"grad_accum_steps {config.grad_accum_steps}")
    if config.distributed.enabled and config.distributed.num_processes > 1 and jax.process_count() == 1:
        raise RuntimeError("distributed.enabled: call vera_jax.train.initialize_distributed(config) "
                           "before any JAX computation (before building the task)")


def make_train_step(task: Task, config, tx, schedules, mesh, batch_axes):
    """The trainer's update step, (state, frozen, batch) -> (state, metrics), before jit: what
    `train_and_evaluate` runs, for benchmarks that time the real step."""
    accum = int(config.grad_accum_steps)

    def loss_on(trainable, frozen, batch, rng):
        adapted = adapters.combine(trainable, frozen)
        dropout_rng = jax.random.fold_in(rng, 1)
        loss, aux = call_model_fn(task.loss_fn, adapted, config, batch, rng, dropout_rng=dropout_rng)
        return loss.astype(jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}

    grad_fn = jax.value_and_grad(loss_on, has_aux=True)

    def step(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if accum == 1:
            (loss, aux), grads = grad_fn(state.trainable, frozen, batch, rng)
        else:
            def split(x):
                x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, tuple(batch_axes))))

            micro = jax.tree.map(split, batch)

            def body(carry, xs):
                i, mb = xs
                out = grad_fn(state.trainable, frozen, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, out), None

            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
                grad_fn, state.trainable, frozen, jax.tree.map(lambda x: x[0], micro), rng))
            total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            (loss, aux), grads = jax.tree.map(lambda x: x / accum, total)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux,
                   **{f"lr/{g}": s(state.step) for g, s in schedules.items()}}
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

    return step


class _Preemption:
    """SIGTERM, seen between steps. One process: a Python handler sets a flag (the old handler is
    restored by close()). Under jax.distributed, JAX's preemption sync service owns SIGTERM and
    agrees on a step that every process reaches, so all of them checkpoint the same step."""

    def __init__(self):
        self.raised = False
        self._old = None
        if not jax.distributed.is_initialized() and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def reached(self, step: int) -> bool:
        return self.raised or multihost_utils.reached_preemption_sync_point(step)

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


def _peak_memory() -> Optional[int]:
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def train_and_evaluate(config, workdir: str, task: Task) -> TrainResult:
    """Trains `task.adapted`'s trainable leaves per `config` (see `default_config`), resuming from
    workdir/checkpoints when present; writes metrics.jsonl, tensorboard/, config.json, summary.json."""
    _validate(config, task)
    preemption = _Preemption()
    try:
        return _train_and_evaluate(config, workdir, task, preemption)
    finally:
        preemption.close()


def _train_and_evaluate(config, workdir: str, task: Task, preemption: _Preemption) -> TrainResult:
    wall_start = time.time()
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))

    mesh = mesh_lib.make_mesh(config.mesh)
    repl = mesh_lib.replicated(mesh)
    batch_axes = tuple(config.mesh.batch_axes)
    divisor = mesh_lib.batch_divisor(mesh, batch_axes)
    micro_batch = config.batch_size // config.grad_accum_steps
    if micro_batch % divisor or config.eval_batch_size % divisor:
        raise ValueError(f"batch_size/grad_accum_steps ({micro_batch}) and eval_batch_size "
                         f"({config.eval_batch_size}) must be divisible by the {divisor} devices "
                         f"of mesh axes {batch_axes}")
    batch_sh = mesh_lib.batch_sharding(mesh, batch_axes)

    adapted = task.adapted
    base_sh = mesh_lib.param_shardings(adapted.base, task.param_axes, mesh, config.mesh.rules)
    full_sh = adapted.replace(base=base_sh, adapter=jax.tree.map(lambda _: repl, adapted.adapter),
                              projections=jax.tree.map(lambda _: repl, adapted.projections))
    trainable, frozen = adapters.partition(adapted)
    trainable_sh, frozen_sh = (
        jax.tree.map(lambda x, s: None if x is None else s, part, full_sh, is_leaf=_is_none)
        for part in (trainable, frozen))
    trainable = mesh_lib.put(trainable, trainable_sh)
    frozen = mesh_lib.put(frozen, frozen_sh)

    per_epoch = _steps_per_epoch(task, config.batch_size)
    total = _total_steps(config, per_epoch)
    labels = adapters.optax_labels(adapted)
    tx, schedules = make_optimizer(config.optimizer, labels, max(total, 1))
    opt_shapes = jax.eval_shape(tx.init, trainable)
    masked = lambda x: x is None or isinstance(x, optax.MaskedNode)  # noqa: E731
    opt_sh = optax.tree_map_params(tx, lambda x, s: x if masked(x) else s, opt_shapes, trainable_sh,
                                   transform_non_params=lambda _: repl, is_leaf=masked)
    state_sh = TrainState(step=repl, trainable=trainable_sh, opt_state=opt_sh, rng=repl)
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                       opt_state=jax.jit(tx.init, out_shardings=opt_sh)(trainable),
                       rng=jax.random.PRNGKey(config.seed))
    state = jax.device_put(state, state_sh)

    train_step = jax.jit(make_train_step(task, config, tx, schedules, mesh, batch_axes),
                         in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, repl),
                         donate_argnums=(0,))
    evals = task.all_evals()
    def eval_step(ev: Eval):
        if ev.on_adapted:
            return lambda t, f, b: ev.eval_fn(adapters.combine(t, f), b)
        return lambda t, f, b: call_model_fn(ev.eval_fn, adapters.combine(t, f), config, b, train=False)

    eval_steps = {name: jax.jit(eval_step(ev), in_shardings=(trainable_sh, frozen_sh, batch_sh), out_shardings=repl)
                  for name, ev in evals.items()}
    for name, ev in evals.items():
        if (ev.batch_size or config.eval_batch_size) % divisor:
            raise ValueError(f"evals[{name!r}].batch_size {ev.batch_size or config.eval_batch_size} must be "
                             f"divisible by the {divisor} devices of mesh axes {batch_axes}")
    best_eval, best_metric = _best_target(config.best_metric, evals)

    data_iter = data_lib.train_iterator(task.train_data, global_batch=config.batch_size, num_steps=total,
                                        seed=config.seed, shuffle=config.shuffle,
                                        threads=config.data_threads, prefetch=config.data_prefetch,
                                        collate=task.collate, lengths=task.train_lengths,
                                        sort_window=task.sort_window)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                        use_async=config.checkpoint_async)
    writer = MetricWriter(workdir, config.tensorboard)
    meta = {"log_sums": {}, "log_count": 0, "best": None, "last_eval": {}, "last_train": None, "history": []}
    start = 0
    if config.resume:
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
        restored = ckpt.restore_latest(abstract, data_iter)
        if restored is not None:
            state, meta = restored[0], {**meta, **{k: v for k, v in restored[1].items() if v is not None}}
            start = int(state.step)
            logging.info("resumed from step %d in %s", start, ckpt.directory)
    writer.truncate_after(start)
    best = Best(best_metric, config.best_mode, meta["best"])

    def evaluate(name: str, ev: Eval) -> tuple[dict, dict]:
        outputs = []
        for local, n_valid in data_lib.eval_batches(ev.data, ev.batch_size or config.eval_batch_size,
                                                    config.data_threads, collate=ev.collate or task.collate,
                                                    lengths=ev.lengths):
            out = eval_steps[name](state.trainable, frozen, mesh_lib.global_batch(local, batch_sh))
            outputs.append(jax.tree.map(lambda x, n_valid=n_valid: np.asarray(x)[:n_valid], out))
        merged_out = jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)
        return {k: float(v) for k, v in ev.metrics_fn(merged_out).items()}, merged_out

    def epoch_of(step: int) -> Optional[float]:
        return None if per_epoch is None else step / per_epoch

    show = is_main and config.progress_bar
    on_tty = show and sys.stderr.isatty()

    def progress(line: str) -> None:
        """One line of progress: above the bar on a TTY, else a plain line (a log has no bar)."""
        if on_tty:
            tqdm.write(line, file=sys.stderr)
        elif show:
            print(line, file=sys.stderr, flush=True)

    def at(step: int) -> str:
        epoch = epoch_of(step)
        return f"step {step}/{total}" + ("" if epoch is None else f" (epoch {epoch:.2f})")

    def run_eval(step: int, name: str, ev: Eval) -> None:
        metrics, outputs = evaluate(name, ev)
        progress(f"{task.name} {at(step)} eval {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if name == best_eval:
            best.update(step, epoch_of(step), metrics)
            meta["best"] = best.state
        meta["last_eval"] = {**meta["last_eval"], name: metrics}
        meta["history"] = [*meta["history"], {"step": step, "epoch": epoch_of(step), "eval": name, **metrics}]
        writer.write(step, {**{f"{name}/{k}": v for k, v in metrics.items()},
                            **({} if per_epoch is None else {"epoch": epoch_of(step)})})
        if ev.write_fn is not None and is_main:
            ev.write_fn(workdir, step, outputs, metrics)

    bar = tqdm(total=total, initial=start, disable=not on_tty, desc=task.name, dynamic_ncols=True)
    run_examples, run_time = 0, 0.0
    try:
        if total == 0:  # evaluation only: the adapter as attached (e.g. the untuned model)
            for name, ev in evals.items():
                run_eval(0, name, ev)
        for step in range(start + 1, total + 1):
            if preemption.reached(step - 1):
                ckpt.save(step - 1, state, meta, data_iter)
                ckpt.wait()
                logging.warning("%s", Preempted(step - 1))
                raise Preempted(step - 1)
            t_step = time.perf_counter()
            batch = mesh_lib.global_batch(next(data_iter), batch_sh)
            state, metrics = train_step(state, frozen, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            run_time += time.perf_counter() - t_step
            run_examples += config.batch_size
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                ckpt.wait()
                raise NonFiniteLossError(step, metrics["loss"], metrics["grad_norm"], ckpt.latest_step())
            for k, v in metrics.items():
                meta["log_sums"][k] = meta["log_sums"].get(k, 0.0) + v
            meta["log_count"] += 1
            bar.update(1)
            if step % config.log_every_steps == 0 or step == total:
                means = {f"train/{k}": v / meta["log_count"] for k, v in meta["log_sums"].items()}
                meta.update(log_sums={}, log_count=0, last_train=means)
                writer.write(step, {**means, **({} if per_epoch is None else {"epoch": epoch_of(step)})})
                shown = dict(loss=f"{means['train/loss']:.4g}",
                             lr=f"{max(v for k, v in means.items() if k.startswith('train/lr/')):.3g}",
                             ex_s=f"{run_examples / run_time:.1f}")
                bar.set_postfix(shown)
                if not on_tty:
                    progress(f"{task.name} {at(step)}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
            for name, ev in evals.items():
                if step == total or _eval_due(ev.every, config.eval_every_steps, step, per_epoch, name):
                    run_eval(step, name, ev)
            if step % config.checkpoint_every_steps == 0 or step == total:
                ckpt.save(step, state, meta, data_iter)
        ckpt.wait()
    finally:
        bar.close()
        writer.close()
        ckpt.close()
        if hasattr(data_iter, "close"):
            data_iter.close()

    final_adapted = adapters.combine(state.trainable, frozen)
    summary = {
        "task": task.name,
        "steps": total,
        "epochs": epoch_of(total),
        "resumed_from_step": start or None,
        "final": {"train": meta["last_train"], "eval": meta["last_eval"].get(best_eval),
                  "evals": meta["last_eval"]},
        "best": {"eval": best_eval, "metric": best.metric, "mode": best.mode, **best.state},
        "evals": meta["history"],
        "trainable_params": adapters.count_trainable(adapted),
        "wall_time_s": time.time() - wall_start,
        "train_time_s": run_time,
        "examples_per_sec": run_examples / run_time if run_time > 0 else None,
        "peak_memory_bytes": _peak_memory(),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "mesh": dict(mesh.shape),
    }
    if is_main:
        _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
        _write_json(os.path.join(workdir, "summary.json"), summary)
    return TrainResult(adapted=final_adapted, summary=summary)
