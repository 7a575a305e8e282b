"""Metric sinks (JSONL + TensorBoard, process 0 only) and best-so-far tracking."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time

import jax
import numpy as np


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


class EventFile:
    """TensorBoard scalar event file (TFRecord framing of tensorflow.Event protos), written
    without TensorFlow: the environment has neither tensorflow nor tensorboard installed."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        self._file = open(self.path, "ab")
        self._write(b"\x09" + struct.pack("<d", time.time()) + _field(3, b"brain.Event:2"))

    def _write(self, event: bytes) -> None:
        header = struct.pack("<Q", len(event))
        self._file.write(header + struct.pack("<I", _masked_crc32c(header)) + event
                         + struct.pack("<I", _masked_crc32c(event)))

    def scalars(self, step: int, values: dict) -> None:
        summary = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                           for tag, value in values.items())
        self._write(b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step) + _field(5, summary))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _scalar(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


class MetricWriter:
    """Appends {"step": s, **metrics} lines to workdir/metrics.jsonl and TensorBoard scalars.

    On resume, `truncate_after(step)` drops lines written after the restored checkpoint, so the
    file of an interrupted-then-resumed run equals that of an uninterrupted one."""

    def __init__(self, workdir: str, tensorboard: bool):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active and tensorboard:
            self._tb = EventFile(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Keeps the lines of steps <= `step` (and drops a line cut short by a kill)."""
        if not self.active or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [ln for ln in f if ln.endswith("\n") and json.loads(ln)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(lines)

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self._tb.scalars(step, scalars)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Best:
    """Best value of one eval metric so far, with the step/epoch where it happened."""

    def __init__(self, metric: str, mode: str, state: dict | None = None):
        if mode not in ("max", "min"):
            raise ValueError(f"best_mode: expected max|min, got {mode!r}")
        self.metric, self.mode = metric, mode
        self.state = dict(state or {"value": None, "step": None, "epoch": None, "metrics": None})

    def update(self, step: int, epoch: float | None, metrics: dict) -> None:
        name = self.metric or next(iter(metrics))
        if name not in metrics:
            raise KeyError(f"best_metric {name!r} not among the eval metrics {sorted(metrics)}")
        self.metric = name
        value = float(metrics[name])
        best = self.state["value"]
        better = best is None or (value > best if self.mode == "max" else value < best)
        if better and not math.isnan(value):
            self.state = {"value": value, "step": step, "epoch": epoch, "metrics": dict(metrics)}
