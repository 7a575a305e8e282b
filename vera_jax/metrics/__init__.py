"""Benchmark metrics: GLUE on host numpy arrays; the E2E NLG scorer's five (`nlg`, `score_e2e`);
GSM8K answer parsing and accuracy as HF PEFT's MetaMathQA comparison scores them (`gsm8k`)."""

from . import gsm8k, nlg
from .glue import METRICS, accuracy, compute, f1, matthews_corrcoef, pearson, spearman
from .nlg import score_e2e

__all__ = ["METRICS", "accuracy", "compute", "f1", "matthews_corrcoef", "pearson", "spearman", "gsm8k", "nlg",
           "score_e2e"]
