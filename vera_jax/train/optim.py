"""AdamW with warmup + decay, clipping and per-group learning rates from the adapter labels."""

from __future__ import annotations

import jax
import optax


def warmup_steps(opt_config, total_steps: int) -> int:
    if opt_config.warmup_steps > 0:
        return int(opt_config.warmup_steps)
    return int(round(opt_config.warmup_ratio * total_steps))


def make_schedule(peak: float, opt_config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then linear/cosine decay to 0 at `total_steps`, or constant."""
    warm = warmup_steps(opt_config, total_steps)
    rest = max(total_steps - warm, 1)
    kind = opt_config.schedule
    if kind == "linear":
        decay = optax.linear_schedule(peak, 0.0, rest)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, rest)
    elif kind == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optimizer.schedule: expected linear|cosine|constant, got {kind!r}")
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm])


def _decay_mask(exclude):
    """Callable mask (so it follows whatever params multi_transform hands each group)."""
    def keep(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) not in exclude

    return lambda params: jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt_config, labels, total_steps: int):
    """(optax transform, {group: schedule}) for the label tree from `vera_jax.optax_labels`.

    Groups are the labels present ("adapter", "head", "full"); each gets AdamW with its own peak
    lr (`learning_rates[group]`, else `learning_rate`) and weight decay, sharing the schedule
    shape. Gradient clipping acts on the global norm over all groups."""
    groups = sorted({g for g in jax.tree.leaves(labels) if g is not None})
    if not groups:
        raise ValueError("optimizer: the adapted params have no trainable leaves")
    known = {"adapter", "head", "full"}
    for field in ("learning_rates", "weight_decays"):
        unknown = set(opt_config[field].keys()) - known
        if unknown:
            raise ValueError(f"optimizer.{field}: unknown groups {sorted(unknown)}; expected {sorted(known)}")
    mask = _decay_mask(tuple(opt_config.weight_decay_exclude))
    schedules, txs = {}, {}
    for g in groups:
        schedules[g] = make_schedule(float(opt_config.learning_rates.get(g, opt_config.learning_rate)),
                                     opt_config, total_steps)
        txs[g] = optax.adamw(schedules[g], b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                             weight_decay=float(opt_config.weight_decays.get(g, opt_config.weight_decay)),
                             mask=mask)
    parts = []
    if opt_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
    parts.append(optax.multi_transform(txs, labels))
    return optax.chain(*parts), schedules
