"""Benchmark metrics (GLUE) computed on host numpy arrays."""

from .glue import METRICS, accuracy, compute, f1, matthews_corrcoef, pearson, spearman

__all__ = ["METRICS", "accuracy", "compute", "f1", "matthews_corrcoef", "pearson", "spearman"]
