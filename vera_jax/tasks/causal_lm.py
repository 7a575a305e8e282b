"""What every causal-LM family shares (E2E NLG, instruction tuning, math): the loss on target tokens
only and the batch that marks them. Examples are {"ids": prompt + target token ids, "prompt": number
of prompt tokens}; the loss covers the tokens after the prompt.

`next_token_losses` never holds all the logits when the model exposes `hidden_states` and
`logits_from_hidden` (every causal LM in `vera_jax.models`): the LM head and the cross-entropy
run on config.model.loss_chunk positions at a time (`vera_jax.train.losses`), so a 262K
vocabulary costs O(chunk x vocab) memory, not O(batch x T x vocab)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vera_jax.train import losses

DEFAULT_LOSS_CHUNK = 256  # positions whose logits exist at once; 0: all logits at once


def loss_chunk(config) -> int:
    """config.model.loss_chunk (DEFAULT_LOSS_CHUNK when absent), checked."""
    chunk = config.model.get("loss_chunk", DEFAULT_LOSS_CHUNK)
    if not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"model.loss_chunk: expected an integer >= 0 (0: all logits at once), got {chunk!r}")
    return chunk


def chunks_hidden(module) -> bool:
    """Whether `module` has the two methods the chunked loss needs."""
    return callable(getattr(module, "hidden_states", None)) and callable(getattr(module, "logits_from_hidden", None))


def next_token_losses(module, params, batch, *, chunk: int = DEFAULT_LOSS_CHUNK, smoothing: float = 0.0,
                      rng=None):
    """Per-position losses (batch, T - 1), float32, of predicting batch["ids"][:, 1:] from the
    model run on batch["ids"] / batch["mask"] ((1 - s) * NLL + s * uniform CE; `rng`: dropout on,
    None: deterministic). Chunked when `chunk` > 0 and the model allows it, else from all logits."""
    kw = {"deterministic": False, "rngs": {"dropout": jax.random.fold_in(rng, 0)}} if rng is not None else {}
    variables, targets = {"params": params}, batch["ids"][:, 1:]
    if chunk and chunks_hidden(module):
        hidden = module.apply(variables, batch["ids"], attention_mask=batch["mask"], method="hidden_states", **kw)

        def head(h):
            return module.apply(variables, h, method="logits_from_hidden")

        return losses.chunked_token_losses(hidden[:, :-1], targets, head, chunk, smoothing)
    logits = module.apply(variables, batch["ids"], attention_mask=batch["mask"], **kw)
    return losses.token_losses_from_logits(logits[:, :-1], targets, smoothing)


def weighted_mean(per_token, weights):
    """Mean of `per_token` over positions with weight (0 when there are none)."""
    return (per_token * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def shifted_loss_of(module, params, batch, *, chunk: int = DEFAULT_LOSS_CHUNK, smoothing: float = 0.0, rng=None):
    """The mean next-token loss over the target positions batch["weights"][:, 1:] marks."""
    per_token = next_token_losses(module, params, batch, chunk=chunk, smoothing=smoothing, rng=rng)
    return weighted_mean(per_token, batch["weights"][:, 1:])


def token_nll(logits, targets):
    """Cross-entropy of each position's logits (..., vocab) against its target id, float32 (...)."""
    return losses.token_losses_from_logits(logits, targets)


def lm_loss(logits, targets, weights, smoothing: float = 0.0):
    """Mean over weighted positions of label-smoothed cross-entropy ((1 - s) * NLL + s * uniform CE)."""
    return weighted_mean(losses.token_losses_from_logits(logits, targets, smoothing), weights)


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


def leading_special_tokens(tokenizer) -> list[int]:
    """The token ids the tokenizer puts before any text by default (Gemma's and Llama's `<bos>`;
    none for GPT-2 or SmolLM2), for formats that encode their parts with add_special_tokens=False
    and would otherwise drop a BOS the model was trained with."""
    text = "a"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return list(full[:k])
    return []
