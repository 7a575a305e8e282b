"""Trainer configuration: every field the trainer reads, with its default and meaning. Plain
ml_collections, no JAX: a config file builds on it without starting JAX."""

from __future__ import annotations

import ml_collections

# logical param axis -> mesh axis (None: replicated); first match wins
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("joined_kv", "tensor"),
    # a scanned model's layer axis stays whole: each device runs every scan step on its slices of the
    # other axes (mapping it to a mesh axis would make every step gather its layer's params)
    ("layers", None),
)


def default_config() -> ml_collections.ConfigDict:
    """Defaults for `train_and_evaluate`; a family config starts from this and overrides fields."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # PRNG seed for dropout keys and the per-epoch data shuffle
    c.num_train_steps = -1  # optimizer steps; -1: num_epochs * steps_per_epoch; 0: only run the evals
    c.num_epochs = 1.0  # used when num_train_steps == -1 (may be fractional)
    c.batch_size = 32  # global examples per optimizer step (all processes, all microbatches)
    c.eval_batch_size = 64  # global examples per eval step (last batch padded, padding dropped)
    c.grad_accum_steps = 1  # microbatches per optimizer step (explicit scan inside the jitted step)
    c.shuffle = True  # reshuffle the training examples every epoch (seeded by `seed` and the epoch)
    c.data_threads = 2  # host threads that prefetch batches
    c.data_prefetch = 4  # batches prefetched ahead of the device

    c.adapter_path = "merged"  # merged: params = merge(adapted); factored: x@W0 + adapter term per Dense call
    c.compute_dtype = "float32"  # float32 | bfloat16: params fed to the model are cast (trainable stays fp32)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-3  # peak learning rate of every group not in learning_rates
    c.optimizer.learning_rates = ml_collections.ConfigDict()  # per label ("adapter", "head", "full") peak lr
    c.optimizer.weight_decay = 0.0  # AdamW decoupled weight decay of every group not in weight_decays
    c.optimizer.weight_decays = ml_collections.ConfigDict()  # per label weight decay
    c.optimizer.weight_decay_exclude = ("bias", "scale")  # leaf names never decayed (biases, norms)
    c.optimizer.b1 = 0.9  # Adam beta1
    c.optimizer.b2 = 0.999  # Adam beta2
    c.optimizer.eps = 1e-8  # Adam epsilon
    c.optimizer.grad_clip_norm = 0.0  # clip the global gradient norm to this; 0: no clipping
    c.optimizer.warmup_steps = 0  # linear warmup from 0 over this many steps (wins over warmup_ratio)
    c.optimizer.warmup_ratio = 0.0  # warmup as a fraction of num_train_steps when warmup_steps == 0
    c.optimizer.schedule = "linear"  # after warmup: linear (to 0) | cosine (to 0) | constant

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size; -1 takes the devices the other axes leave
    c.mesh.fsdp = 1  # fully-sharded axis: batch and params (via rules) split over it
    c.mesh.tensor = 1  # tensor-parallel axis: params split over it by rules
    c.mesh.batch_axes = ("data", "fsdp")  # mesh axes the batch dimension is split over
    c.mesh.rules = DEFAULT_RULES  # logical param axis -> mesh axis (None: replicated); first match wins

    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False  # call jax.distributed.initialize in `initialize_distributed`
    c.distributed.coordinator_address = ""  # host:port of process 0; "" lets JAX detect it (TPU/SLURM)
    c.distributed.num_processes = -1  # -1: detected by JAX
    c.distributed.process_id = -1  # -1: detected by JAX

    c.checkpoint_every_steps = 1000  # save every N steps (also on SIGTERM and at the end)
    c.keep_checkpoints = 3  # keep the last K checkpoints
    c.checkpoint_async = True  # write checkpoints in a background thread
    c.resume = True  # continue from the newest readable checkpoint in workdir/checkpoints

    c.log_every_steps = 50  # train metrics (means over the interval) to JSONL/TensorBoard/progress bar
    c.eval_every_steps = 0  # evaluate every N steps; 0: every epoch (MapDataset train_data); always at the end
    c.best_metric = ""  # eval metric whose best value is tracked ("" : the first one metrics_fn returns)
    c.best_mode = "max"  # max | min
    c.tensorboard = True  # also write TensorBoard event files to workdir/tensorboard
    c.progress_bar = True  # progress on process 0's stderr: a tqdm bar on a TTY, else a line per log_every_steps
    return c
