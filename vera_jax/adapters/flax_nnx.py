"""flax.nnx models: `apply_vera(model)` (or an nnx State) gives an Adapted over the model's
`nnx.Param` state as a pure dict (see core.py); `nnx_merge` turns it back into a model.

Inside a jitted loss, work on the pure dicts instead (what the trainer's loss_fn receives):

    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = lambda params, batch, rng: loss(nnx.merge(graphdef, params, rest)(batch["x"]), batch)
"""

from __future__ import annotations

from flax import nnx

from .core import Adapted, merge


def nnx_merge(model: nnx.Module, adapted: Adapted) -> nnx.Module:
    """A new Module: `model` with its Params replaced by `merge(adapted)` (W0 + delta, and any
    trained head); `model` itself is left as it was. Its other state (batch stats, RNGs) is
    `model`'s."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx Module, got {type(model).__name__}")
    if not isinstance(adapted, Adapted):
        raise TypeError(f"adapted: expected an Adapted tree, got {type(adapted).__name__}")
    if adapted.source != "nnx":
        raise ValueError("adapted: attached to linen params; nnx_merge needs one attached to this nnx "
                         "model (apply_vera(model), load_adapter(path, model), ...)")
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, merge(adapted), rest)
