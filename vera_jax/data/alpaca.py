"""Alpaca-format instruction data: records {"instruction", "input", "output"} from a local JSON
array or JSONL file, or the Hub dataset `yahma/alpaca-cleaned` (the VeRA paper's data), and the
Stanford Alpaca prompt template.

The prompts are `PROMPT_DICT` of Stanford's `train.py` verbatim; the response is the output
followed by EOS. `ALPACA_CHAT_TEMPLATE` is the same format as a Jinja chat template, so a model
tuned on these prompts answers multi-turn conversations (MT-Bench) through
`tokenizer.apply_chat_template`: one user turn renders exactly as `PROMPT_NO_INPUT`, and each
earlier answer ends in EOS before the next instruction.

A record missing a field, with a non-string field, or with an empty instruction or output is
bad: `check` lists every bad record's index and reason and skips them ("skip", counted and
logged) or raises `AlpacaDataError` ("refuse").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

from .common import DataUnavailableError, hub_unreachable

FIELDS = ("instruction", "input", "output")
BAD_RECORDS = ("skip", "refuse")
HUB_DATASET, HUB_FILE = "yahma/alpaca-cleaned", "alpaca_data_cleaned.json"
HEADER = ("Below is an instruction that describes a task{}. "
          "Write a response that appropriately completes the request.\n\n")
PROMPT_INPUT = (HEADER.format(", paired with an input that provides further context")
                + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = HEADER.format("") + "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_CHAT_TEMPLATE = (
    "{{ '" + HEADER.format("").replace("\n", "\\n") + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token + '\\n\\n' }}"
    "{% endif %}{% endfor %}")


class AlpacaDataError(ValueError):
    """An alpaca file that cannot be read, or bad records under bad_records="refuse"."""


@dataclasses.dataclass(frozen=True)
class Records:
    """The good records, the (index, reason) of each bad one, and where they came from."""

    records: list
    bad: list
    source: str

    def __len__(self) -> int:
        return len(self.records)


def format_prompt(record: dict) -> str:
    """The Stanford Alpaca prompt of a record (the with-input variant when `input` is non-empty)."""
    return (PROMPT_INPUT if record["input"] else PROMPT_NO_INPUT).format(**record)


def user_message(record: dict) -> str:
    """The record as one chat user turn: the instruction, then the input after a blank line."""
    return record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")


def read_file(path: str) -> list:
    """The raw records of a JSON array or a JSONL file (one object per line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.path: {path} is not a file (expected alpaca-format JSON or JSONL)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise AlpacaDataError(f"{path}:{e.lineno}: {e.msg}") from None
    else:
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise AlpacaDataError(f"{path}:{line_no}: {e.msg}") from None
    if not rows:
        raise AlpacaDataError(f"{path}: no records")
    return rows


def _problem(row) -> Optional[str]:
    if not isinstance(row, dict):
        return f"not an object ({type(row).__name__})"
    missing = [k for k in FIELDS if k not in row]
    if missing:
        return f"missing field(s) {missing}"
    wrong = [k for k in FIELDS if not isinstance(row[k], str)]
    if wrong:
        return f"non-string field(s) {wrong}"
    empty = [k for k in ("instruction", "output") if not row[k].strip()]
    return f"empty {' and '.join(empty)}" if empty else None


def check(rows: list, source: str, bad_records: str = "skip") -> Records:
    """Good records ({instruction, input, output} strings) and the bad ones' (index, reason)."""
    if bad_records not in BAD_RECORDS:
        raise ValueError(f"data.bad_records: expected one of {BAD_RECORDS}, got {bad_records!r}")
    good, bad = [], []
    for i, row in enumerate(rows):
        reason = _problem(row)
        if reason is None:
            good.append({k: row[k] for k in FIELDS})
        else:
            bad.append((i, reason))
    if bad:
        listing = "; ".join(f"record {i}: {why}" for i, why in bad[:10]) + (
            f"; ... {len(bad) - 10} more" if len(bad) > 10 else "")
        if bad_records == "refuse":
            raise AlpacaDataError(f"{source}: {len(bad)} bad record(s) (data.bad_records='refuse'; set it to "
                                  f"'skip' to drop them): {listing}")
        logging.warning("%s: skipped %d bad record(s) of %d: %s", source, len(bad), len(rows), listing)
    if not good:
        raise AlpacaDataError(f"{source}: no usable records ({len(bad)} bad)")
    return Records(good, bad, source)


def hub_file(dataset: str = HUB_DATASET, filename: str = HUB_FILE, *, revision: str = "",
             cache_dir: str = "", timeout: float = 5.0) -> str:
    """The dataset's JSON file from the Hugging Face cache, else downloaded; offline and not
    cached, fails within `timeout` seconds saying how to pass a local file."""
    from huggingface_hub import hf_hub_download

    kw = dict(repo_id=dataset, filename=filename, repo_type="dataset", revision=revision or None,
              cache_dir=cache_dir or None)
    try:
        return hf_hub_download(**kw, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached; whether it can be downloaded is checked next
        pass
    reason = hub_unreachable(timeout)
    if reason is not None:
        raise DataUnavailableError(
            f"data.hub_dataset {dataset!r} ({filename}) is not in the Hugging Face cache and cannot be downloaded "
            f"({reason}). Offline, pass an alpaca-format JSON/JSONL file with --config.data.path=/path/to/{filename} "
            "(e.g. ../shared/data/instruct/alpaca_data.json, the original Stanford Alpaca 52K)")
    return hf_hub_download(**kw)


def load(path: str = "", *, dataset: str = HUB_DATASET, filename: str = HUB_FILE, revision: str = "",
         cache_dir: str = "", bad_records: str = "skip", timeout: float = 5.0) -> Records:
    """The checked records of the local file `path`, or of the Hub dataset when `path` is empty
    (through `datasets` when it is installed and the Hub is reachable, else `hub_file`)."""
    if path:
        return check(read_file(path), path, bad_records)
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        if hub_unreachable(timeout) is None:
            rows = datasets.load_dataset(dataset, split="train", revision=revision or None,
                                         cache_dir=cache_dir or None)
            return check([dict(r) for r in rows], f"hub {dataset}", bad_records)
    local = hub_file(dataset, filename, revision=revision, cache_dir=cache_dir, timeout=timeout)
    return check(read_file(local), f"hub {dataset} ({local})", bad_records)
