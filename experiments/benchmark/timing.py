"""Compile time, step time, FLOPs and memory of jitted functions, and the machine they ran on.

Step time is the median of `iters` calls after `warmup` untimed ones, each waited for with
`block_until_ready`. Several functions are timed interleaved (one call of each per round), so a
load spike on this shared machine lands on all of them alike and their ratios stay meaningful.
Compile time is `jit(f).lower(*args).compile()`; FLOPs are XLA's count of the program before
backend passes (`xla_flops`). Memory comes from
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


def xla_flops(fn: Callable, args: tuple) -> float | None:
    """XLA's FLOP count of `fn` on `args`' shapes, from the program lowered for the CPU before any
    backend pass (None where no CPU backend is available). Counted this way on every machine:
    a GPU's lowered programs give no count, and its compiled ones leave out the cuBLAS calls the
    matmuls become (~1/3 of the real figure on an H200). The count is the same arithmetic on any
    backend; on the CPU it equals the compiled program's count within 0.1%."""
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    try:
        analysis = jax.jit(fn).trace(*abstract).lower(lowering_platforms=("cpu",)).cost_analysis()
    except Exception:  # no CPU backend to analyse with
        return None
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) and analysis else analysis
    flops = analysis.get("flops") if isinstance(analysis, dict) else None
    return float(flops) if flops is not None and flops >= 0 else None


def measure_all(entries: dict[str, tuple], iters: int, warmup: int) -> dict[str, dict]:
    """Times several functions interleaved. `entries[name] = (fn, args, donate, carry)`: each is
    compiled (donating `donate`), then every round calls each once; the first `carry` outputs of
    a call feed its next call's first `carry` arguments (a donated train state)."""
    compiled, args, carries, results = {}, {}, {}, {}
    for name, (fn, fn_args, donate, carry) in entries.items():
        start = time.perf_counter()
        compiled[name] = jax.jit(fn, donate_argnums=donate).lower(*fn_args).compile()
        results[name] = {"compile_s": time.perf_counter() - start, "memory": memory(compiled[name]),
                         "xla_flops": xla_flops(fn, fn_args)}
        args[name], carries[name] = tuple(fn_args), carry
    times: dict[str, list] = {name: [] for name in entries}
    for i in range(warmup + iters):
        for name in entries:
            start = time.perf_counter()
            out = jax.block_until_ready(compiled[name](*args[name]))
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
            if carries[name]:
                args[name] = tuple(out[:carries[name]]) + args[name][carries[name]:]
    for name in entries:
        results[name] = {"step_ms": 1e3 * statistics.median(times[name]), **results[name]}
    return results


def count_all(entries: dict[str, tuple]) -> dict[str, dict]:
    """`measure_all`'s entries counted, not run: XLA's FLOPs of each (args may be abstract)."""
    return {name: {"xla_flops": xla_flops(fn, fn_args)} for name, (fn, fn_args, _, _) in entries.items()}


def measure(fn: Callable, args: tuple, iters: int, warmup: int, donate: tuple[int, ...] = (),
            carry: int = 0) -> dict:
    """`measure_all` for one function."""
    return measure_all({"fn": (fn, args, donate, carry)}, iters, warmup)["fn"]


def machine() -> dict:
    """Load average and CPU count next to the backend: timings on a busy machine mean little."""
    return {"load_avg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "jax": f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})"}
