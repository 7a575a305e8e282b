"""Head only: no adapter; only the `trainable_extra` modules (e.g. the classifier) train."""

from __future__ import annotations

from .. import core
from ..config import HeadConfig
from . import registry


def apply_head(params, trainable_extra=("classifier",)) -> core.Adapted:
    """No adapter; only the `trainable_extra` modules train (the paper's "head only" baseline)."""
    return core.attach(params, HeadConfig(trainable_extra=trainable_extra))


METHOD = registry.register(registry.Method(name=HeadConfig.method, config_class=HeadConfig))
