"""flax.nnx models: `apply_vera(model)` (or an nnx State) gives an Adapted over the model's
`nnx.Param` state as a pure dict (see core.py); every path runs on it (`call_adapted`: merged,
factored, auto, a quantized base, adapter dropout; nnx layers are hooked by `nnx_hooks`).
`nnx_merge` turns it back into a model.

Inside a jitted loss, work on the pure dicts (what the trainer's loss_fn receives):

    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = lambda params, batch, rng: loss(nnx.merge(graphdef, params, rest)(batch["x"]), batch)

For an nnx training loop of one's own, `NnxAdapted(model, adapted)` is the adapter as nnx state:
its leaves are `nnx.LoRAParam`s (flax's own type for trainable low-rank adapter state), so
`nnx.Optimizer(adapted_model, tx, wrt=adapted_model.trainable)` (`wrt=nnx.LoRAParam` when no
base leaf is trained alongside) moves them and nothing of the frozen base.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from .core import Adapted, merge
from .factored import call_adapted


def nnx_merge(model: nnx.Module, adapted: Adapted) -> nnx.Module:
    """A new Module: `model` with its Params replaced by `merge(adapted)` (W0 + delta, and any
    trained head); `model` itself is left as it was. Its other state (batch stats, RNGs) is
    `model`'s."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx Module, got {type(model).__name__}")
    _check_nnx(adapted)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, merge(adapted), rest)


def _check_nnx(adapted: Adapted) -> None:
    if not isinstance(adapted, Adapted):
        raise TypeError(f"adapted: expected an Adapted tree, got {type(adapted).__name__}")
    if adapted.source != "nnx":
        raise ValueError("adapted: attached to linen params; this needs one attached to the nnx model "
                         "(apply_vera(model), load_adapter(path, model), ...)")


class Projection(nnx.Variable):
    """A frozen projection the method draws (VeRA's A/B); no filter for training selects it."""


class NnxAdapted(nnx.Module):
    """An nnx model with an adapter attached, as one nnx Module: `model` (the base, its Params
    frozen unless the config's `trainable_extra` names them), the adapter's leaves as
    `nnx.LoRAParam`s under `adapter`, its projections as `Projection`s. Calling it runs the model
    on `path` ("auto", "merged" or "factored", as `call_adapted`), with `dropout_rng` for the
    config's adapter dropout. `adapted()` gives the Adapted tree back (for save_adapter, merge)."""

    def __init__(self, model: nnx.Module, adapted: Adapted, path: str = "auto"):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"model: expected an nnx Module, got {type(model).__name__}")
        _check_nnx(adapted)
        if path not in ("auto", "merged", "factored"):
            raise ValueError(f"path: {path!r} is not one of ['auto', 'merged', 'factored']")
        self.model = model
        self.adapter = nnx.data(jax.tree.map(nnx.LoRAParam, adapted.adapter))
        self.projections = nnx.data(jax.tree.map(Projection, adapted.projections))
        self.config, self.layers, self.extra, self.path = adapted.config, adapted.layers, adapted.extra, path

    @property
    def trainable(self) -> nnx.filterlib.Filter:
        """The filter of what trains: the adapter's LoRAParams and the base leaves named by
        `trainable_extra`; for `nnx.Optimizer(..., wrt=)` and `nnx.DiffState`."""
        extra = {("model", *path) for path in self.extra}
        return nnx.Any(nnx.LoRAParam, lambda path, _: tuple(path) in extra)

    def adapted(self) -> Adapted:
        """The Adapted tree of the current values (the model's Params as its base)."""
        value = lambda v: v.get_value()  # noqa: E731
        is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        return Adapted(nnx.state(self.model, nnx.Param).to_pure_dict(),
                       jax.tree.map(value, dict(self.adapter), is_leaf=is_var),
                       jax.tree.map(value, dict(self.projections), is_leaf=is_var),
                       self.config, self.layers, self.extra, "nnx")

    def __call__(self, *args, dropout_rng: jax.Array | None = None, train: bool = True, **kwargs) -> Any:
        graphdef, _, rest = nnx.split(self.model, nnx.Param, ...)
        built = []

        def run(params, *call_args):
            built.append(nnx.merge(graphdef, params, rest))
            return built[-1](*call_args, **kwargs)

        out = call_adapted(run, self.adapted(), *args, path=self.path, train=train, dropout_rng=dropout_rng)
        nnx.update(self.model, nnx.state(built[-1], nnx.Not(nnx.Param)))  # batch stats, RNG counts
        return out
