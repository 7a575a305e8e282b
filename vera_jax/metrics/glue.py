"""GLUE dev-set metrics as the benchmark reports them (numpy; no scikit-learn or scipy needed).

Each function takes 1-D predictions and references and returns a float. Degenerate inputs give
the conventional value rather than NaN where GLUE's scorers do the same: Matthews correlation is 0
when either side has a single class (as scikit-learn), F1 is 0 with no positive predictions and
labels, and a correlation with a constant side is NaN (undefined; a run that predicts one
constant score should not look like 0 correlation).
"""

from __future__ import annotations

import numpy as np


def _pair(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(predictions).reshape(-1), np.asarray(references).reshape(-1)
    if p.shape != r.shape:
        raise ValueError(f"predictions ({p.shape[0]}) and references ({r.shape[0]}) differ in length")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, r


def accuracy(predictions, references) -> float:
    p, r = _pair(predictions, references)
    return float(np.mean(p == r))


def f1(predictions, references, positive: int = 1) -> float:
    """Binary F1 of the `positive` class (MRPC: 1 = paraphrase)."""
    p, r = _pair(predictions, references)
    tp = np.sum((p == positive) & (r == positive))
    denom = np.sum(p == positive) + np.sum(r == positive)
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(predictions, references) -> float:
    """Matthews correlation for binary or multi-class labels (Gorodkin's R_K; CoLA)."""
    p, r = _pair(predictions, references)
    classes, codes = np.unique(np.concatenate([r, p]), return_inverse=True)
    k = len(classes)
    conf = np.zeros((k, k), np.float64)
    np.add.at(conf, (codes[: len(r)], codes[len(r):]), 1)
    t, q = conf.sum(1), conf.sum(0)
    c, s = np.trace(conf), conf.sum()
    denom = np.sqrt(s * s - q @ q) * np.sqrt(s * s - t @ t)
    return float((c * s - t @ q) / denom) if denom else 0.0


def pearson(predictions, references) -> float:
    p, r = _pair(predictions, references)
    p, r = p.astype(np.float64) - p.mean(), r.astype(np.float64) - r.mean()
    denom = np.sqrt((p @ p) * (r @ r))
    return float(p @ r / denom) if denom else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.zeros(len(counts))
    np.add.at(sums, inverse, ranks)
    return (sums / counts)[inverse]


def spearman(predictions, references) -> float:
    p, r = _pair(predictions, references)
    return pearson(_ranks(p.astype(np.float64)), _ranks(r.astype(np.float64)))


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_corrcoef": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def compute(names, predictions, references) -> dict[str, float]:
    """{name: metric(predictions, references)} for the metric names of a task."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {sorted(METRICS)}")
    return {n: METRICS[n](predictions, references) for n in names}
