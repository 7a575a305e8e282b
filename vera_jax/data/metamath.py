"""MetaMathQA (training) and GSM8K (validation, test) as HF PEFT's MetaMathQA method comparison
reads them (`method_comparison/MetaMathQA/data.py`): MetaMathQA rows whose f"{query} {response}"
has at most CHAR_LIMIT characters, in dataset order; GSM8K "main" with question/answer renamed to
query/response; validation = the first VALID_SIZE of a legacy `np.random.seed(0)` shuffle of the
train split's indices.

MetaMathQA comes from a local JSON array / JSONL file (`data.path`), else the Hub
(`meta-math/MetaMathQA` through `datasets`, or its JSON file from the Hugging Face cache); GSM8K
from a directory holding openai/grade-school-math's train.jsonl and test.jsonl."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from .common import DataUnavailableError, hub_unreachable

CHAR_LIMIT = 1300  # PEFT: "a token limit of 768 for query + response" excludes longer texts
VALID_SIZE = 50  # GSM8K train rows PEFT validates on during training
HUB_DATASET = "meta-math/MetaMathQA"
HUB_FILE = "MetaMathQA-395K.json"


class MathDataError(ValueError):
    """A MetaMathQA or GSM8K file that is not what it should be; the message names the file."""


@dataclasses.dataclass
class Rows:
    """Records {"query", "response"} and where they came from."""

    records: list
    source: str

    def __len__(self) -> int:
        return len(self.records)


def read_records(path: str, fields: tuple = ("query", "response")) -> list[dict]:
    """The records of a JSON array or JSONL file, each checked to have string `fields`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.path: {path} is not a file (expected a JSON array or JSONL of {fields})")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise MathDataError(f"{path}: not JSON/JSONL ({e.msg}, line {e.lineno})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in fields):
            raise MathDataError(f"{path}: record {i} lacks string field(s) {list(fields)}: {str(row)[:200]}")
    if not rows:
        raise MathDataError(f"{path}: no records")
    return rows


def char_filter(records: list[dict], limit: int = CHAR_LIMIT) -> list[dict]:
    """The records whose f"{query} {response}" has at most `limit` characters, in order (PEFT's filter)."""
    return [r for r in records if len(f"{r['query']} {r['response']}") <= limit]


def load_metamath(path: str = "", *, dataset: str = HUB_DATASET, filename: str = HUB_FILE, revision: str = "",
                  timeout: float = 5.0) -> Rows:
    """MetaMathQA's {"query", "response"} records, unfiltered, from `path` or the Hub; offline and
    not cached, fails within `timeout` seconds naming --config.data.path."""
    if path:
        return Rows([{"query": r["query"], "response": r["response"]} for r in read_records(path)], path)
    reason = hub_unreachable(timeout)
    if reason is None:
        try:
            import datasets
        except ImportError:
            datasets = None
        if datasets is not None:
            ds = datasets.load_dataset(dataset, split="train", revision=revision or None)
            return Rows([{"query": q, "response": r} for q, r in zip(ds["query"], ds["response"])], f"hub {dataset}")
    from huggingface_hub import hf_hub_download

    kw = dict(repo_id=dataset, filename=filename, repo_type="dataset", revision=revision or None)
    try:
        local = hf_hub_download(**kw, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - not cached: download it, or say how to pass a file
        if reason is not None:
            raise DataUnavailableError(
                f"data.hub_dataset {dataset!r} ({filename}) is not in the Hugging Face cache and cannot be downloaded "
                f"({reason}). Offline, pass the file with --config.data.path=/path/to/{filename} (a JSON array "
                "or JSONL of {query, response} records)") from e
        local = hf_hub_download(**kw)
    return Rows([{"query": r["query"], "response": r["response"]} for r in read_records(local)],
                f"hub {dataset} ({local})")


def load_gsm8k(directory: str) -> dict[str, Rows]:
    """{"train", "test"} GSM8K records as {"query", "response"} (PEFT's renaming) from `directory`."""
    out = {}
    for split in ("train", "test"):
        path = os.path.join(directory, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.gsm8k_dir: {directory} has no {split}.jsonl (openai/grade-school-math's "
                                    "grade_school_math/data, e.g. ../shared/data/gsm8k)")
        rows = read_records(path, ("question", "answer"))
        out[split] = Rows([{"query": r["question"], "response": r["answer"]} for r in rows], path)
    return out


def valid_indices(n_train: int, size: int = VALID_SIZE) -> np.ndarray:
    """The GSM8K train rows PEFT validates on: the first `size` of np.arange(n_train) shuffled
    after np.random.seed(0) (the legacy global generator, i.e. RandomState(0))."""
    indices = np.arange(n_train)
    np.random.RandomState(0).shuffle(indices)
    return indices[:size]
