"""Run a test module's `child(arg)` in a fresh process with simulated CPU devices.

JAX fixes its device count when it starts, so a test that needs a 2-device mesh runs its body in
a child process (`XLA_FLAGS=--xla_force_host_platform_device_count=N`); the child prints one JSON
line last, returned here as a dict."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_child(module: str, arg, *, devices: int = 2, timeout: int = 300) -> dict:
    """`tests/<module>.py`'s `child(arg)` on `devices` CPU devices; its last stdout line as JSON."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    code = f"import sys; sys.path.insert(0, {HERE!r}); import {module}; {module}.child({arg!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
