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

