"""Compile time, step time and memory of one jitted function, and the machine it ran on.

Step time is the median of `iters` calls after `warmup` untimed ones, each waited for with
`block_until_ready`; compile time is `jit(f).lower(*args).compile()`. Memory comes from
`compiled.memory_analysis()` (peak estimate = argument + output + temp - alias; temp is the
activation memory) and the backend's `peak_bytes_in_use` where it reports one: that is the
process's high-water mark so far, so it only grows down a table (None on CPU).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import jax


def memory(compiled) -> dict:
    """XLA's compile-time memory figures (bytes) and the backend's peak, where it has one."""
    m = compiled.memory_analysis()
    out: dict[str, Any] = {}
    if m is not None:
        out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
               "temp": int(m.temp_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
        out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    stats = jax.devices()[0].memory_stats()
    out["device_peak"] = int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
    return out


def measure(fn: Callable, args: tuple, iters: int, warmup: int, donate: tuple[int, ...] = (),
            carry: int = 0) -> dict:
    """Compiles `fn` on `args`, then times it. The first `carry` outputs feed the next call's first
    `carry` arguments (a donated train state), as in a training loop."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if carry:
            args = tuple(out[:carry]) + tuple(args[carry:])
    return {"step_ms": 1e3 * statistics.median(times), "compile_s": compile_s, "memory": memory(compiled)}


def machine() -> dict:
    """Load average and CPU count next to the backend: timings on a busy machine mean little."""
    return {"load_avg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "jax": f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})"}
