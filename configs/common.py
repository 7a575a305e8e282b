"""Helpers every family's configs share."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """"key=value,key=value" (values typed like the defaults) over `defaults`: the `:arg` of
    `--config file.py:method=lora,seed=1`."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config arg {item!r}: expected key=value with key in {sorted(defaults)}")
        out[key] = type(defaults[key])(value)
    return out


def runnable_methods(c: ml_collections.ConfigDict) -> list[str]:
    """The registered methods config `c` can run: one that adapts layers needs its section
    `c.<method>` and rate `c.lr.<method>`; one that trains only the head needs `c.model.head`."""
    from vera_jax.adapters.methods import registry

    def runnable(name):
        method = registry.get(name)
        if method.adapts_layers:
            return name in c and name in c.lr
        return method.trains_base or bool(c.model.head)

    return [name for name in registry.names() if runnable(name)]


def check_method(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c`, or ValueError when `c.method` is not one of `runnable_methods(c)`."""
    allowed = runnable_methods(c)
    if c.method not in allowed:
        raise ValueError(f"config arg method: expected one of {allowed}, got {c.method!r}")
    return c
