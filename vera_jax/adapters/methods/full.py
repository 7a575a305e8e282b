"""Full fine-tuning: every base leaf trains ("full"); `trainable_extra` ones get the "head" label."""

from __future__ import annotations

from .. import core
from ..config import FullConfig
from . import registry


def apply_full(params, trainable_extra=("classifier",)) -> core.Adapted:
    """Full fine-tuning: all base leaves train; `trainable_extra` ones get the "head" label."""
    return core.attach(params, FullConfig(trainable_extra=trainable_extra))


METHOD = registry.register(registry.Method(name=FullConfig.method, config_class=FullConfig, trains_base=True))
