"""GLUE tasks: what each one reads, predicts and reports, from tfds `glue/<task>` or local TSVs.

Local files follow the layout `download_glue_data.py` writes (`RTE/train.tsv`, `RTE/dev.tsv`, ...):
tab-separated, no quoting (MRPC's strings contain bare `"`), a header naming the columns except
CoLA's (source, label, original mark, sentence), MRPC's header behind a UTF-8 BOM. Columns are
found by header name, so a file whose header lacks a needed column is rejected before any row is
read, and every malformed row raises `GlueDataError` naming the file and the 1-based line.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from .common import DataUnavailableError, reachable


class GlueDataError(ValueError):
    """A GLUE file or split that cannot be read; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    tsv_columns: header names of (text_a, text_b or None, label) in the local TSV; for CoLA's
        headerless files, column indices instead.
    label_names: TSV label strings in class order (0, 1, ...); None: labels are integers in the
        file, or the float score for regression (num_labels == 1).
    tfds_keys: tfds `glue/<name>` feature names of (text_a, text_b or None).
    metrics: what GLUE reports for the task; best_metric selects the best epoch (the paper's
        column: accuracy, Matthews correlation for CoLA, Pearson for STS-B).
    """

    name: str
    dir_name: str
    num_labels: int
    tsv_columns: tuple
    tfds_keys: tuple
    metrics: tuple[str, ...]
    best_metric: str
    label_names: Optional[tuple[str, ...]] = None
    header: bool = True

    @property
    def regression(self) -> bool:
        return self.num_labels == 1

    @property
    def pairs(self) -> bool:
        return self.tfds_keys[1] is not None

    @property
    def tfds_name(self) -> str:
        return f"glue/{self.name}"


TASKS = {t.name: t for t in (
    GlueTask("sst2", "SST-2", 2, ("sentence", None, "label"), ("sentence", None),
             ("accuracy",), "accuracy"),
    GlueTask("mrpc", "MRPC", 2, ("#1 String", "#2 String", "Quality"), ("sentence1", "sentence2"),
             ("accuracy", "f1"), "accuracy"),
    GlueTask("cola", "CoLA", 2, (3, None, 1), ("sentence", None),
             ("matthews_corrcoef", "accuracy"), "matthews_corrcoef", header=False),
    GlueTask("qnli", "QNLI", 2, ("question", "sentence", "label"), ("question", "sentence"),
             ("accuracy",), "accuracy", label_names=("entailment", "not_entailment")),
    GlueTask("rte", "RTE", 2, ("sentence1", "sentence2", "label"), ("sentence1", "sentence2"),
             ("accuracy",), "accuracy", label_names=("entailment", "not_entailment")),
    GlueTask("stsb", "STS-B", 1, ("sentence1", "sentence2", "score"), ("sentence1", "sentence2"),
             ("pearson", "spearman"), "pearson"),
)}


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"data.task: unknown GLUE task {name!r}; known: {sorted(TASKS)}")
    return TASKS[key]


@dataclasses.dataclass
class Split:
    """Raw examples of one split: text_b is None for single-sentence tasks; labels are int64
    class ids, or float32 scores for regression."""

    text_a: list[str]
    text_b: Optional[list[str]]
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.text_a)


def _parse_label(task: GlueTask, value: str, where: str):
    if task.regression:
        try:
            score = float(value)
        except ValueError:
            raise GlueDataError(f"{where}: score {value!r} is not a number") from None
        if not np.isfinite(score):
            raise GlueDataError(f"{where}: score {value!r} is not finite")
        return score
    if task.label_names is not None:
        if value not in task.label_names:
            raise GlueDataError(f"{where}: label {value!r} is not one of {list(task.label_names)}")
        return task.label_names.index(value)
    if value not in {str(i) for i in range(task.num_labels)}:
        raise GlueDataError(f"{where}: label {value!r} is not one of {list(range(task.num_labels))}")
    return int(value)


def read_tsv(path: str, task: GlueTask) -> Split:
    """Examples of one GLUE TSV file (the task's own column layout)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no such file (expected the GLUE layout <dir>/{task.dir_name}/train.tsv, dev.tsv)")
    text_a, text_b, labels = [], [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    start = 0
    if task.header:
        if not lines:
            raise GlueDataError(f"{path}: empty file, expected a header naming {[c for c in task.tsv_columns if c]}")
        header = lines[0].rstrip("\r").split("\t")
        missing = [c for c in task.tsv_columns if c is not None and c not in header]
        if missing:
            raise GlueDataError(f"{path}:1: header {header} lacks the {task.name} columns {missing}")
        columns = [None if c is None else header.index(c) for c in task.tsv_columns]
        width, start = len(header), 1
    else:
        columns = list(task.tsv_columns)
        width = max(c for c in columns if c is not None) + 1
    for lineno, line in enumerate(lines[start:], start + 1):
        where = f"{path}:{lineno}"
        fields = line.rstrip("\r").split("\t")
        if len(fields) != width:
            raise GlueDataError(f"{where}: expected {width} tab-separated columns for {task.name}, got {len(fields)}")
        a, b, y = (None if c is None else fields[c] for c in columns)
        if not a.strip() or (b is not None and not b.strip()):
            raise GlueDataError(f"{where}: empty sentence")
        text_a.append(a)
        if b is not None:
            text_b.append(b)
        labels.append(_parse_label(task, y, where))
    if not text_a:
        raise GlueDataError(f"{path}: no examples")
    return Split(text_a, text_b if task.pairs else None,
                 np.asarray(labels, np.float32 if task.regression else np.int64), path)


def read_local(data_dir: str, task: GlueTask, split: str) -> Split:
    """`split` ("train" | "dev") of a local GLUE directory."""
    return read_tsv(os.path.join(data_dir, task.dir_name, f"{split}.tsv"), task)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_tfds(task: GlueTask, split: str, data_dir: Optional[str] = None, download: bool = True,
              timeout: float = 5.0) -> Split:
    """`split` ("train" | "dev") of tfds `glue/<task>` through `tfds.data_source` (array_record; no
    TensorFlow at read time), downloading and preparing it when absent and the network is up.

    Without network, fails within `timeout` seconds instead of retrying downloads."""
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text  # noqa: F401  (registers glue)

    tfds_split = {"train": "train", "dev": "validation"}[split]
    try:
        source = tfds.data_source(task.tfds_name, split=tfds_split, data_dir=data_dir, download=False)
    except Exception as missing:  # noqa: BLE001 - tfds raises several types for "not prepared"
        reason = reachable("https://dl.fbaipublicfiles.com", timeout) if download else "download=False"
        if reason is not None:
            raise DataUnavailableError(
                f"tfds {task.tfds_name} is not prepared in {data_dir or '~/tensorflow_datasets'} and cannot be "
                f"downloaded ({reason}). Offline, point config.data.dir at a GLUE TSV directory holding "
                f"{task.dir_name}/train.tsv and {task.dir_name}/dev.tsv, e.g. --config.data.dir=../shared/data/glue"
            ) from missing
        source = tfds.data_source(task.tfds_name, split=tfds_split, data_dir=data_dir, download=True)
    key_a, key_b = task.tfds_keys
    text_a, text_b, labels = [], [], []
    for ex in source:
        text_a.append(_text(ex[key_a]))
        if key_b is not None:
            text_b.append(_text(ex[key_b]))
        labels.append(ex["label"])
    where = f"tfds {task.tfds_name}[{tfds_split}]"
    if not text_a:
        raise GlueDataError(f"{where}: no examples")
    labels = np.asarray(labels, np.float32 if task.regression else np.int64)
    if not task.regression and (labels.min() < 0 or labels.max() >= task.num_labels):
        raise GlueDataError(f"{where}: labels outside 0..{task.num_labels - 1} (unlabelled test split?)")
    return Split(text_a, text_b if task.pairs else None, labels, where)


def load_split(task: GlueTask, split: str, *, data_dir: str = "", tfds_data_dir: Optional[str] = None,
               download: bool = True, limit: int = 0, timeout: float = 5.0) -> Split:
    """A split from `data_dir` (GLUE TSVs) when given, else tfds; `limit` > 0 keeps a fixed random
    `limit` examples (quick runs; random because files are often grouped by source or genre),
    the same for every run seed, in file order."""
    out = read_local(data_dir, task, split) if data_dir else read_tfds(task, split, tfds_data_dir, download, timeout)
    if 0 < limit < len(out):
        keep = np.sort(np.random.default_rng(0).choice(len(out), limit, replace=False))
        out = Split([out.text_a[i] for i in keep], None if out.text_b is None else [out.text_b[i] for i in keep],
                    out.labels[keep], f"{out.source} ({limit} of {len(out)}, fixed random subset)")
    return out


def tokenize(split: Split, tokenizer, max_length: int) -> dict[str, list[np.ndarray]]:
    """Ragged token ids per example (pairs as the tokenizer joins them, truncated longest-first to
    `max_length`): {"input_ids": [...], "token_type_ids": [...]} of int32 arrays."""
    kwargs = dict(truncation=True, max_length=max_length, return_token_type_ids=True, return_attention_mask=False)
    enc = (tokenizer(split.text_a, split.text_b, **kwargs) if split.text_b is not None
           else tokenizer(split.text_a, **kwargs))
    return {k: [np.asarray(x, np.int32) for x in enc[k]] for k in ("input_ids", "token_type_ids")}

