"""Benchmark metrics: GLUE on host numpy arrays; the E2E NLG scorer's five (`nlg`, `score_e2e`)."""

from . import nlg
from .glue import METRICS, accuracy, compute, f1, matthews_corrcoef, pearson, spearman
from .nlg import score_e2e

__all__ = ["METRICS", "accuracy", "compute", "f1", "matthews_corrcoef", "pearson", "spearman", "nlg", "score_e2e"]
