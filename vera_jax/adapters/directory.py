"""Adapter directories on disk, ours and PEFT's: `adapter_config.json` plus
`adapter_model.safetensors`, read with errors that name the file and written atomically.

Each format keeps its own checks and error class: the readers take the class to raise. Pickle
files (`adapter_model.bin`, ...) are never read, since loading one can run arbitrary code.

Writing stages both files in a hidden directory beside the target and then publishes them, so a
failure while writing leaves no partial adapter: a new directory appears whole by one rename; an
existing one (which may hold other files) gets the tensors and then the config each replaced
atomically, the config last, and is untouched if anything fails before that.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_config(directory: Path, error: type[Exception], what: str) -> dict:
    """The JSON object in `directory/adapter_config.json`; raises `error` naming the file if it is
    missing, not JSON or not an object. `what` names the format in the message ("PEFT adapter")."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise error(f"no {what} at {directory}: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is corrupt: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise error(f"{path} is corrupt: expected a JSON object")
    return config


def read_tensors(directory: Path, error: type[Exception], what: str, *,
                 expected_sha256: str | None = None) -> dict[str, np.ndarray]:
    """The arrays in `directory/adapter_model.safetensors`; raises `error` naming the file if it is
    missing (or only a pickle file is there), corrupt, or its SHA-256 is not `expected_sha256`."""
    path = directory / TENSORS_FILE
    if not path.is_file():
        pickled = [f for f in PICKLE_FILES if (directory / f).is_file()]
        if pickled:
            raise error(
                f"{directory / pickled[0]} is a pickle file, which can run arbitrary code when loaded and is "
                f"never read; convert it to {TENSORS_FILE} first, e.g. in PyTorch: "
                f"safetensors.torch.save_file(torch.load(path, weights_only=True), '{TENSORS_FILE}'), or "
                "PeftModel.from_pretrained(model, dir).save_pretrained(out_dir) (PEFT writes safetensors)")
        raise error(f"{what} at {directory}: {TENSORS_FILE} is missing")
    if expected_sha256 is not None and sha256(path) != expected_sha256:
        raise error(f"{path} is corrupt or was not written by this {CONFIG_FILE} (SHA-256 differs)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{path} is corrupt: {e}") from None


def write(directory: Path, tensors: Mapping[str, np.ndarray], config: Callable[[Path], dict], *,
          metadata: dict[str, str], sort_keys: bool = False) -> Path:
    """Writes `tensors` and the JSON object `config(tensors_path)` (called once the tensors file is
    written, e.g. to record its hash) as an adapter directory, atomically (see the module
    docstring). Returns `directory`."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.{secrets.token_hex(6)}.tmp"
    staging.mkdir()
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(staging / TENSORS_FILE),
                  metadata=metadata)
        record = config(staging / TENSORS_FILE)
        (staging / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=sort_keys) + "\n")
        if directory.exists():
            for name in (TENSORS_FILE, CONFIG_FILE):
                os.replace(staging / name, directory / name)
        else:
            os.rename(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
