"""Adapter configurations, validated when built.

Every error raised here is a `ValueError` whose message starts with the class and field name
(`VeraConfig.r: ...`), so a bad sweep entry or a hand-edited adapter file says what to fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar, Mapping

_DEFAULT_LAYER_NAMES = ("layer", "layers", "h", "block", "blocks")
PROJECTION_INITS = ("kaiming_uniform", "kaiming_normal", "uniform")
PROJECTION_MODES = ("shared", "per_shape")


def _as_str_tuple(cls: str, name: str, value: Any, allow_empty: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        value = tuple(value)
    except TypeError:
        raise ValueError(f"{cls}.{name}: expected a string or a sequence of strings, got {value!r}") from None
    if not value and not allow_empty:
        raise ValueError(f"{cls}.{name}: must not be empty")
    for item in value:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{cls}.{name}: every entry must be a non-empty string, got {item!r}")
        try:
            re.compile(item)
        except re.error as e:
            raise ValueError(f"{cls}.{name}: {item!r} is not a valid pattern ({e})") from None
    return value


def _check_int(cls: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{cls}.{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _check_finite(cls: str, name: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{cls}.{name}: expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{cls}.{name}: expected a number > 0, got {value!r}")
    return float(value)


def _check_dropout(cls: str, value: Any) -> float:
    value = _check_finite(cls, "dropout", value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{cls}.dropout: expected 0 <= dropout < 1, got {value!r}")
    return value


def _layers_tuple(cls: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        value = tuple(value)
    except TypeError:
        raise ValueError(
            f"{cls}.layers_to_transform: expected None, an int or a sequence of ints, got {value!r}") from None
    if not value:
        raise ValueError(f"{cls}.layers_to_transform: must not be empty (use None for every layer)")
    return tuple(_check_int(cls, "layers_to_transform", v, 0) for v in value)


def _axes_tuple(cls: str, value: Any, field: str = "kernel_in_axes",
                what: str = "number of input axes") -> tuple[tuple[str, int], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    try:
        items = tuple((str(k), v) for k, v in items)
    except (TypeError, ValueError):
        raise ValueError(f"{cls}.{field}: expected a mapping pattern -> {what}, got {value!r}") from None
    _as_str_tuple(cls, field, [k for k, _ in items], allow_empty=True)
    return tuple(sorted((k, _check_int(cls, field, v, 1)) for k, v in items))


def _check_stacking(cls: str, set_, config) -> None:
    """Validates the two fields that say where layer axes are (see `targets.py`)."""
    set_("stacked_axes", _axes_tuple(cls, config.stacked_axes, "stacked_axes", "number of leading layer axes"))
    set_("layer_axis_names", _as_str_tuple(cls, "layer_axis_names", config.layer_axis_names, allow_empty=True))


def _tuples(value):
    """JSON lists back to the tuples a config holds (hashable: configs are static under jit)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class MethodConfig:
    """Base of every method's config (a frozen dataclass): unknown-field errors, dict round trip
    for adapter files. A subclass sets the class attribute `method` to its registered name."""

    method: ClassVar[str]

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; allowed: {list(cls.field_names())}")
        return cls(**{k: _tuples(v) for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        return out

    def replace(self, **changes):
        return self.from_dict({**dataclasses.asdict(self), **changes})


def _strict_init(cls):
    """Turns Python's "unexpected keyword argument" into a ValueError listing the allowed fields."""
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; allowed: {list(cls.field_names())}")
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    return cls


@_strict_init
@dataclasses.dataclass(frozen=True)
class VeraConfig(MethodConfig):
    """VeRA: one frozen random pair A (r, in_max), B (out_max, r) shared by every targeted layer.

    Fields:
      r: rank of the shared projections (paper: 1024 RoBERTa-base, 256 RoBERTa-large).
      targets: module names ("query" matches every module whose path ends in `query`, "self/query"
        a suffix of two names) or regexes full-matched on the '/'-joined module path.
      d_initial: initial value of every entry of the scaling vector d (b starts at zero).
      seed: the PRNG seed of A and B (threefry2x32; see `projections.py`).
      dropout: dropout on the adapter's input, factored path only.
      trainable_extra: modules (same matching as targets) whose own parameters are trained too,
        e.g. ("classifier",) for a GLUE head; labelled "head" for the optimizer.
      layers_to_transform: restrict to these layer indices (found in path names such as
        `layer_3`, `h_3`, `layers/3`; see `layers_pattern`); None adapts every layer.
      layers_pattern: path names that carry a layer index.
      kernel_in_axes: pattern -> number of leading kernel axes that are inputs, for kernels with
        more than two axes (DenseGeneral); unlisted kernels have one input axis.
      stacked_axes: pattern -> number of leading layer axes of every param under a module matching
        it: the module `nn.scan` / nnx `vmap` stacked over layers (e.g. {"layers": 1}; a scan of
        scans: {"groups": 1, "layers": 1}). Each layer is adapted as its unrolled twin would be.
      layer_axis_names: axis names that mark a leading layer axis in flax partitioning metadata
        (`nn.scan(..., metadata_params={nn.PARTITION_NAME: "layers"})`); `stacked_axes` wins.
      save_projection: store A and B in adapter files (as PEFT allows) instead of only their
        fingerprint.
      projections: "shared" (VeRA, PEFT: one pair A (r, in_max), B (out_max, r), sliced per layer)
        or "per_shape": one pair A (r, in), B (out, r) per distinct (in, out) kernel shape, each
        drawn from its own key derived from the seed and the shape (no slicing; for models whose
        layers differ in shape, e.g. LLaMA's MLP vs attention).
    Ablation switches (the paper's Section 5 and the review discussion; defaults are VeRA):
      share_projections: False gives each layer its own A_l (r, in), B_l (out, r), drawn from a
        key derived from the seed and the layer's path (trainable count unchanged).
      projection_init: "kaiming_uniform" (VeRA, PEFT), "kaiming_normal" (std sqrt(2 / fan_in)),
        or "uniform" (U(-1, 1), no fan-in scaling).
      train_d / train_b: False freezes that vector at its initial value (the paper's "only b" /
        "only d" rows); at least one must train.
      b_initial: initial value of b (VeRA: 0, so training starts at the base model). Freezing b
        at 0 would freeze the adapter at zero, so train_b=False requires b_initial != 0.
    """

    method: ClassVar[str] = "vera"
    r: int = 256
    targets: tuple[str, ...] = ("query", "value")
    d_initial: float = 0.1
    seed: int = 0
    dropout: float = 0.0
    trainable_extra: tuple[str, ...] = ()
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = _DEFAULT_LAYER_NAMES
    kernel_in_axes: tuple[tuple[str, int], ...] = ()
    stacked_axes: tuple[tuple[str, int], ...] = ()
    layer_axis_names: tuple[str, ...] = ("layers",)
    save_projection: bool = False
    projections: str = "shared"
    share_projections: bool = True
    projection_init: str = "kaiming_uniform"
    train_d: bool = True
    train_b: bool = True
    b_initial: float = 0.0

    def __post_init__(self):
        name = type(self).__name__
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("r", _check_int(name, "r", self.r, 1))
        set_("targets", _as_str_tuple(name, "targets", self.targets, allow_empty=False))
        set_("d_initial", _check_finite(name, "d_initial", self.d_initial))
        set_("seed", _check_int(name, "seed", self.seed, 0))
        if self.seed >= 2**63:
            raise ValueError(f"{name}.seed: expected a seed < 2**63, got {self.seed}")
        set_("dropout", _check_dropout(name, self.dropout))
        set_("trainable_extra", _as_str_tuple(name, "trainable_extra", self.trainable_extra, allow_empty=True))
        set_("layers_to_transform", _layers_tuple(name, self.layers_to_transform))
        set_("layers_pattern", _as_str_tuple(name, "layers_pattern", self.layers_pattern, allow_empty=False))
        set_("kernel_in_axes", _axes_tuple(name, self.kernel_in_axes))
        _check_stacking(name, set_, self)
        for flag in ("save_projection", "share_projections", "train_d", "train_b"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{name}.{flag}: expected True or False, got {getattr(self, flag)!r}")
        set_("b_initial", _check_finite(name, "b_initial", self.b_initial))
        if not self.train_b and self.b_initial == 0.0:
            raise ValueError(
                f"{name}.b_initial: train_b=False with b_initial=0 keeps the adapter at zero; set b_initial != 0")
        if not (self.train_d or self.train_b):
            raise ValueError(f"{name}.train_d, {name}.train_b: at least one of the vectors must train")
        if self.projection_init not in PROJECTION_INITS:
            raise ValueError(f"{name}.projection_init: {self.projection_init!r} is not one of {list(PROJECTION_INITS)}")
        if self.projections not in PROJECTION_MODES:
            raise ValueError(f"{name}.projections: {self.projections!r} is not one of {list(PROJECTION_MODES)}")
        if self.projections == "per_shape" and not self.share_projections:
            raise ValueError(f"{name}.projections, {name}.share_projections: per_shape shares one pair per kernel "
                             "shape, share_projections=False gives each layer its own; choose one")


@_strict_init
@dataclasses.dataclass(frozen=True)
class DVoraConfig(VeraConfig):
    """DVoRA (DoRA paper, Liu et al. 2024): VeRA's update as the direction, DoRA's magnitude.

    W' = m * (W0 + delta_VeRA) / ||W0 + delta_VeRA||_c, the norm per output column over the input
    axis and detached from the gradient (as DoRA); m (out,) is trained and starts at the norm of
    the initial W0 + delta (= ||W0||_c with b_initial=0), so training starts at the base model.
    Every field means what it means in `VeraConfig`.
    """

    method: ClassVar[str] = "dvora"


@_strict_init
@dataclasses.dataclass(frozen=True)
class LoraConfig(MethodConfig):
    """LoRA, the baseline: per-layer trainable A (r, in) and B (out, r), delta scaled by alpha / r.

    A is Kaiming-uniform (PEFT's bound 1/sqrt(in)) from `seed` folded with the layer's index,
    B starts at zero. The other fields mean what they mean in `VeraConfig`.
    """

    method: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("query", "value")
    dropout: float = 0.0
    trainable_extra: tuple[str, ...] = ()
    seed: int = 0
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = _DEFAULT_LAYER_NAMES
    kernel_in_axes: tuple[tuple[str, int], ...] = ()
    stacked_axes: tuple[tuple[str, int], ...] = ()
    layer_axis_names: tuple[str, ...] = ("layers",)

    def __post_init__(self):
        name = type(self).__name__
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", _check_int(name, "r", self.r, 1))
        set_("alpha", _check_finite(name, "alpha", self.alpha, positive=True))
        set_("targets", _as_str_tuple(name, "targets", self.targets, allow_empty=False))
        set_("dropout", _check_dropout(name, self.dropout))
        set_("trainable_extra", _as_str_tuple(name, "trainable_extra", self.trainable_extra, allow_empty=True))
        set_("seed", _check_int(name, "seed", self.seed, 0))
        set_("layers_to_transform", _layers_tuple(name, self.layers_to_transform))
        set_("layers_pattern", _as_str_tuple(name, "layers_pattern", self.layers_pattern, allow_empty=False))
        set_("kernel_in_axes", _axes_tuple(name, self.kernel_in_axes))
        _check_stacking(name, set_, self)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@_strict_init
@dataclasses.dataclass(frozen=True)
class HeadConfig(MethodConfig):
    """No adapter: only the modules in `trainable_extra` (e.g. the classifier) are trained."""

    method: ClassVar[str] = "head"
    trainable_extra: tuple[str, ...] = ("classifier",)

    def __post_init__(self):
        object.__setattr__(
            self, "trainable_extra",
            _as_str_tuple("HeadConfig", "trainable_extra", self.trainable_extra, allow_empty=False)
        )


@_strict_init
@dataclasses.dataclass(frozen=True)
class FullConfig(MethodConfig):
    """Full fine-tuning: every parameter is trained; `trainable_extra` modules are labelled "head"
    (their own learning rate), the rest "full"."""

    method: ClassVar[str] = "full"
    trainable_extra: tuple[str, ...] = ("classifier",)

    def __post_init__(self):
        object.__setattr__(
            self, "trainable_extra",
            _as_str_tuple("FullConfig", "trainable_extra", self.trainable_extra, allow_empty=True)
        )
