"""What every causal-LM family shares (E2E NLG, instruction tuning): the loss on target tokens only
and the batch that marks them. Examples are {"ids": prompt + target token ids, "prompt": number of
prompt tokens}; the loss covers the tokens after the prompt."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def token_nll(logits, targets):
    """Cross-entropy of each position's logits (..., vocab) against its target id, float32 (...)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def lm_loss(logits, targets, weights, smoothing: float = 0.0):
    """Mean over weighted positions of label-smoothed cross-entropy ((1 - s) * NLL + s * uniform CE)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    per_token = (1.0 - smoothing) * nll - smoothing * logp.mean(-1)
    return (per_token * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def pad_targets(rows, length: int, pad_id: int) -> dict:
    """Right-padded {"ids", "mask", "weights"} (len(rows), length) int32; weights are 1 on the
    target tokens (positions from row["prompt"] on), so the shifted loss predicts only those."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask, weights = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        n = len(row["ids"])
        ids[i, :n], mask[i, :n] = row["ids"], 1
        weights[i, int(row["prompt"]):n] = 1
    return {"ids": ids, "mask": mask, "weights": weights}


def shifted_loss(logits, batch, smoothing: float = 0.0):
    """`lm_loss` of next-token logits (batch, T, vocab) against the batch's own ids and weights."""
    return lm_loss(logits[:, :-1], batch["ids"][:, 1:], batch["weights"][:, 1:], smoothing)
