"""Trainable / frozen split, optimizer labels and parameter counts (DESIGN contract 2).

`partition` returns two `Adapted` trees of the same structure; each has None where the leaf
belongs to the other. Differentiate with respect to the trainable one only:

    trainable, frozen = partition(adapted)
    loss = lambda t: loss_fn(merge(combine(t, frozen)), batch)
    grads = jax.grad(loss)(trainable)          # None (no gradient) at frozen positions
    tx = optax.multi_transform({"adapter": optax.adamw(1e-2), "head": optax.adamw(4e-3)},
                               optax_labels(adapted))
    opt_state = tx.init(trainable)             # state only for trainable leaves
"""

from __future__ import annotations

import jax

from ..tree import get_path
from .core import Adapted
from .methods import registry

ADAPTER, HEAD, FULL = "adapter", "head", "full"


def _is_none(x) -> bool:
    return x is None


def _label_base(adapted: Adapted):
    """Label per base leaf: HEAD for trainable_extra leaves, FULL for the rest under full
    fine-tuning, else None (frozen)."""
    extra = set(adapted.extra)
    default = FULL if registry.get(adapted.method).trains_base else None

    def label(path, _):
        keys = tuple(k.key for k in path if not isinstance(k, jax.tree_util.GetAttrKey))
        chosen = HEAD if keys in extra else default
        if chosen is not None and len(keys) < len(path):  # a leaf inside a quantized kernel
            raise ValueError(f"{adapted.method}: base leaf {'/'.join(map(str, keys))} is a quantized kernel, which "
                             "stays frozen; leave it unquantized (quant.quantize_params(skip=...)) to train it")
        return chosen

    return jax.tree_util.tree_map_with_path(label, adapted.base)


def optax_labels(adapted: Adapted) -> Adapted:
    """Labels with the structure of `partition(adapted)[0]`: the method's `label` for adapter leaves
    ("adapter", or None for a frozen one such as d with train_d=False), "head" for
    `trainable_extra` leaves, "full" for the base under a method that `trains_base`, None elsewhere."""
    label = registry.get(adapted.method).label
    return adapted.replace(
        base=_label_base(adapted),
        adapter=jax.tree_util.tree_map_with_path(lambda path, _: label(adapted.config, path[-1].key),
                                                 adapted.adapter),
        projections=jax.tree.map(lambda _: None, adapted.projections),
    )


def partition(adapted: Adapted) -> tuple[Adapted, Adapted]:
    """(trainable, frozen): the same tree twice, each with None where the other holds the leaf."""
    labels = optax_labels(adapted)
    pick = lambda want: lambda leaf, lab: leaf if (lab is not None) == want else None  # noqa: E731
    trainable = jax.tree.map(pick(True), adapted, labels, is_leaf=_is_none)
    frozen = jax.tree.map(pick(False), adapted, labels, is_leaf=_is_none)
    return trainable, frozen


def combine(trainable: Adapted, frozen: Adapted) -> Adapted:
    """Inverse of `partition`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=_is_none)


def count_trainable(adapted: Adapted) -> int:
    """Number of trained scalars (adapter vectors plus `trainable_extra` leaves); the masked layers
    of a stacked kernel that `layers_to_transform` keeps only partly are not counted (they are
    never trained), so the count is the unrolled twin's."""
    trainable, _ = partition(adapted)
    total = sum(int(x.size) for x in jax.tree.leaves(trainable))
    for spec in adapted.layers:
        if spec.mask is not None:
            size = sum(int(x.size) for x in jax.tree.leaves(get_path(trainable.adapter, spec.path)))
            total -= size // spec.n_layers * int((~spec.mask).sum())
    return total
