"""The adapter-method registry: one `Method` record per method, looked up by name.

Everything that differs between methods (VeRA, LoRA, DVoRA, head-only, full fine-tuning, or one
registered by a user) is a field here; the library's generic code (attach, merge, the factored
path, the cost model, files, optimizer labels, PEFT interop, the serving bank, the runner) asks
the record and never compares method names.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True)
class PeftMapping:
    """How a method's adapter is written as / read from a Hugging Face PEFT adapter directory.

    peft_type: PEFT's `peft_type` ("VERA", "LORA").
    tensors: our adapter leaf -> PEFT's tensor suffix on the module (e.g. "lambda_d" -> "vera_lambda_d").
    shapes(r, spec): our adapter leaf -> its shape for rank r on that layer (checked on reading).
    default_r: PEFT's default rank, for a config that omits r.
    to_peft(config): the PEFT `adapter_config.json` fields this method sets.
    from_peft(peft_config, r, trainable_extra): our config's fields (not targets) from PEFT's config.
    shared_projections: the adapter has `base_model.vera_A` / `vera_B` (VeRA's shared A/B).
    refusals: (field, allowed values, why) for PEFT options with no counterpart here: reading refuses
      an adapter whose config sets `field` to anything but an empty value or one of `allowed`.
    refuse(config): a reason this config cannot be written as a PEFT adapter, or None.
    """

    peft_type: str
    tensors: Mapping[str, str]
    shapes: Callable[[int, Any], Mapping[str, tuple]]
    default_r: int
    to_peft: Callable[[Any], dict]
    from_peft: Callable[[dict, int, tuple], dict]
    shared_projections: bool = False
    refusals: tuple[tuple[str, tuple, str], ...] = ()
    refuse: Callable[[Any], str | None] = lambda config: None


@dataclasses.dataclass(frozen=True)
class Method:
    """One adapter method. Only `name` and `config_class` are required; a method without `init`
    adapts no layers (head-only, full fine-tuning).

    name: the method's name (`config_class.method`, `--config.method=`, adapter files' "method").
    config_class: its config dataclass (a `MethodConfig` subclass; `targets` etc. when it adapts layers).
    init(params, config, layers) -> (adapter, projections): the per-layer leaves ({module path...:
      {leaf: array}}) at their initial values, and the frozen projections ({} if none); `params`
      is the plain base tree, `layers` the targeted LayerSpecs.
    delta(adapted, spec, vec, dtype) -> (in, out) float32: the layer's additive weight update
      (merged path); `vec` is the layer's adapter dict, `dtype` the products' operand dtype.
    term(adapted, spec, vec, x) -> (..., out): the additive output for input x (..., in) (factored path).
    rescale(adapted, spec, vec, w) -> (out,): optional per-output scale applied to W0 + delta
      (`w`, (in, out) float32), as DoRA-style methods do: merged W' = w * s, factored
      y = s * (x @ W0 + term) + bias.
    cost(tokens, n_in, n_out, r, train) -> {"merged", "factored"}: multiply-adds of both paths
      for one layer (see `cost.py`); None: the auto path always factors.
    label(config, leaf) -> "adapter" | None: the optimizer group of an adapter leaf (None: frozen).
    trains_base: every base leaf trains (label "full"), as in full fine-tuning.
    peft: its PEFT mapping, or None (no PEFT equivalent: save_peft_adapter refuses it).
    lora_factors(adapted, spec, vec) -> (lora_A (r, in), lora_B (out, r)), float32, with delta =
      lora_A.T @ lora_B.T exactly: the method's update as a LoRA with scaling 1 (`interop.to_lora`);
      None: the update is not a plain low-rank product (to_lora refuses the method).
    bank(adapted, spec, vec) -> (d (r,), b (out,)): the two vectors the serving bank batches for a
      layer; None: the bank refuses the method, naming it.
    bank_refuse(adapted) -> a reason this adapter cannot join the bank, or None.

    Stacked layers (nn.scan; `LayerSpec.stack`): every function above sees ONE layer. `init` is
    called on the unrolled twin's layers (per-layer paths `layers_0/...`; `params` then holds the
    targeted modules only, sliced per layer), and the library stacks its per-layer leaves (and
    projections under a layer's path) on the layer axes; `delta`, `term` and `rescale` are
    vmapped over those axes with `spec.per_layer` and the layer's slice of `vec` (and of its own
    projections), so they must be traceable jnp code (no Python branching on array values).
    Nothing else is asked of a method (the serving bank refuses stacked layers: load their file unrolled).
    """

    name: str
    config_class: type
    init: Callable | None = None
    delta: Callable | None = None
    term: Callable | None = None
    rescale: Callable | None = None
    cost: Callable | None = None
    label: Callable[[Any, str], str | None] = lambda config, leaf: "adapter"
    trains_base: bool = False
    peft: PeftMapping | None = None
    lora_factors: Callable | None = None
    bank: Callable | None = None
    bank_refuse: Callable[[Any], str | None] = lambda adapted: None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Method.name: expected a non-empty string, got {self.name!r}")
        if getattr(self.config_class, "method", None) != self.name:
            raise ValueError(f"Method.config_class: {getattr(self.config_class, '__name__', self.config_class)!r} "
                             f"must have the class attribute method = {self.name!r}")
        if self.init is not None and self.delta is None and self.term is None:
            raise ValueError(f"Method {self.name!r}: a method that adapts layers (init) needs delta or term")

    @property
    def adapts_layers(self) -> bool:
        return self.init is not None


_METHODS: dict[str, Method] = {}
_BUILTINS = ("vera", "lora", "dvora", "head", "full")  # modules of this package that register themselves
_builtins_loaded = False


def _load_builtins() -> None:
    """Imports the built-in method modules once (they register on import); done on the registry's
    first use, so that the light `vera_jax.adapters` namespace never imports them eagerly."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for name in _BUILTINS:
            importlib.import_module(f"{__package__}.{name}")


def register(method: Method, *, replace: bool = False) -> Method:
    """Adds `method` to the registry (ValueError if its name is taken, unless replace=True)."""
    if not isinstance(method, Method):
        raise TypeError(f"register: expected a Method, got {type(method).__name__}")
    _load_builtins()
    if method.name in _METHODS and not replace:
        raise ValueError(f"register: method {method.name!r} is already registered; pass replace=True to replace it")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Removes a registered method (KeyError naming the known ones if absent)."""
    get(name)
    del _METHODS[name]


def get(name: str) -> Method:
    """The method called `name`; KeyError naming the registered ones."""
    _load_builtins()
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise KeyError(f"method: {name!r} is not registered; known: {names()}") from None


def for_config(config) -> Method:
    """The method a config object belongs to (by its class's `method`), checked to be its class."""
    method = get(getattr(type(config), "method", None))
    if not isinstance(config, method.config_class):
        raise TypeError(f"config: {type(config).__name__} is not the config class of method {method.name!r} "
                        f"({method.config_class.__name__})")
    return method


def names() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)


def by_peft_type(peft_type) -> Method | None:
    """The method whose PEFT mapping has `peft_type`, else None."""
    _load_builtins()
    return next((m for m in _METHODS.values() if m.peft is not None and m.peft.peft_type == peft_type), None)


get_method, register_method, unregister_method = get, register, unregister  # as `vera_jax` exports them
