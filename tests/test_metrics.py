"""GLUE metrics against hand-worked values and scipy's reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from vera_jax import metrics


def test_accuracy_and_f1_of_the_positive_class():
    pred = [1, 1, 0, 0, 1, 0]
    ref = [1, 0, 0, 1, 1, 0]
    assert metrics.accuracy(pred, ref) == pytest.approx(4 / 6)
    # tp = 2, fp = 1, fn = 1 -> precision = recall = 2/3
    assert metrics.f1(pred, ref) == pytest.approx(2 / 3)
    assert metrics.f1(pred, ref, positive=0) == pytest.approx(2 / 3)
    assert metrics.f1([0, 0], [0, 0]) == 0.0


def test_matthews_matches_the_binary_formula():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 2, 500)
    pred = np.where(rng.random(500) < 0.7, ref, 1 - ref)
    tp, tn = np.sum((pred == 1) & (ref == 1)), np.sum((pred == 0) & (ref == 0))
    fp, fn = np.sum((pred == 1) & (ref == 0)), np.sum((pred == 0) & (ref == 1))
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics.matthews_corrcoef(pred, ref) == pytest.approx(expected, abs=1e-12)
    assert metrics.matthews_corrcoef(ref, ref) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef(1 - ref, ref) == pytest.approx(-1.0)


def test_matthews_is_zero_when_one_class_is_predicted():
    """CoLA runs that collapse to 'acceptable' score 0, as GLUE's scikit-learn scorer gives."""
    assert metrics.matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0


def test_pearson_and_spearman_match_scipy_with_ties():
    rng = np.random.default_rng(1)
    ref = np.round(rng.uniform(0, 5, 300) * 4) / 4  # STS-B style scores with many ties
    pred = ref + rng.normal(0, 1.0, 300)
    pred[:40] = np.round(pred[:40])
    assert metrics.pearson(pred, ref) == pytest.approx(stats.pearsonr(pred, ref)[0], abs=1e-12)
    assert metrics.spearman(pred, ref) == pytest.approx(stats.spearmanr(pred, ref)[0], abs=1e-12)


def test_correlation_with_a_constant_prediction_is_nan():
    assert math.isnan(metrics.pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))
    assert math.isnan(metrics.spearman([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))


def test_compute_names_the_unknown_metric_and_rejects_length_mismatch():
    assert metrics.compute(("accuracy", "f1"), [1, 0], [1, 1]) == {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="unknown metrics \\['bleu'\\]"):
        metrics.compute(("bleu",), [1], [1])
    with pytest.raises(ValueError, match="differ in length"):
        metrics.accuracy([1, 0], [1])
