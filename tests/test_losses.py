"""The chunked causal-LM loss (`vera_jax.train.losses`, `vera_jax.tasks.causal_lm`): equal to the
loss from all logits, value and gradient, for every causal LM of the zoo (GPT-2, LLaMA tied and
untied, Gemma 2's soft-capped head), with label smoothing, dropout and a chunk that does not
divide the sequence; and the memory it saves, from XLA's buffer plan of the jitted gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import loss_memory
from vera_jax.models import gpt2, llama
from vera_jax.tasks import causal_lm
from vera_jax.train import chunked_token_losses, token_losses_from_logits

VOCAB = 97
LLAMA = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
GPT2 = {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}
MODELS = {
    "gpt2": lambda: gpt2.build(GPT2),
    "llama": lambda: llama.build(LLAMA),
    "llama_tied": lambda: llama.build({**LLAMA, "tie_word_embeddings": True}),
    # Gemma 2: a soft-capped head (the chunked loss must cap as the full forward does), a sliding layer
    "gemma2": lambda: llama.build({**LLAMA, "model_type": "gemma2", "tie_word_embeddings": True, "head_dim": 16,
                                   "final_logit_softcapping": 3.0, "attn_logit_softcapping": 2.0,
                                   "sliding_window": 4, "query_pre_attn_scalar": 16}),
}


def batch_of(rows=3, length=13, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (rows, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # a padded row
    weights = mask.copy()
    weights[:, :4] = 0  # a prompt
    return {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask), "weights": jnp.asarray(weights)}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("chunk", [5, 4096])  # 5: one or two positions a row, the last chunk padded
def test_chunked_loss_and_gradient_equal_the_full_loss(name, chunk):
    module = MODELS[name]()
    batch = batch_of()
    params = module.init(jax.random.key(1), batch["ids"])["params"]
    rng = jax.random.key(2) if name == "gpt2" else None  # GPT-2 has dropout: the same masks on both paths

    def loss(p, c):
        return causal_lm.shifted_loss_of(module, p, batch, chunk=c, smoothing=0.1, rng=rng)

    full, full_grad = jax.value_and_grad(loss)(params, 0)
    value, grad = jax.value_and_grad(loss)(params, chunk)
    np.testing.assert_allclose(value, full, rtol=1e-5, atol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad), jax.tree.leaves(full_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    per_token = causal_lm.next_token_losses(module, params, batch, chunk=chunk)
    np.testing.assert_allclose(per_token, causal_lm.next_token_losses(module, params, batch, chunk=0),
                               rtol=1e-5, atol=1e-6)


def test_hidden_states_and_head_compose_to_the_model():
    for name, make in MODELS.items():
        module, batch = make(), batch_of()
        params = module.init(jax.random.key(0), batch["ids"])["params"]
        hidden = module.apply({"params": params}, batch["ids"], attention_mask=batch["mask"], method="hidden_states")
        logits = module.apply({"params": params}, hidden, method="logits_from_hidden")
        np.testing.assert_allclose(logits, module.apply({"params": params}, batch["ids"], attention_mask=batch["mask"]),
                                   rtol=1e-6, atol=1e-6, err_msg=name)


def test_chunked_token_losses_on_any_leading_shape():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(8, VOCAB)), jnp.float32)
    hidden = jnp.asarray(rng.normal(size=(2, 3, 7, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, VOCAB, (2, 3, 7)), jnp.int32)
    want = token_losses_from_logits(hidden @ w, targets, 0.2)
    np.testing.assert_allclose(chunked_token_losses(hidden, targets, lambda h: h @ w, 4, 0.2), want, rtol=1e-6)
    with pytest.raises(ValueError, match="loss_chunk"):
        chunked_token_losses(hidden, targets, lambda h: h @ w, 0)


def test_loss_chunk_config_is_checked():
    import ml_collections

    from vera_jax.tasks.config import model_config

    c = ml_collections.ConfigDict({"model": model_config()})
    assert causal_lm.loss_chunk(c) == 256
    c.model.loss_chunk = -1
    with pytest.raises(ValueError, match="model.loss_chunk"):
        causal_lm.loss_chunk(c)


def test_chunked_loss_plans_a_fraction_of_the_memory():
    record = loss_memory.measure(vocab=16384, width=16, layers=1, batch=4, seq=64, chunks=(0, 32))
    full, chunked = record["runs"]
    assert full["chunk"] == 0 and chunked["chunk"] == 32
    assert full["logits_bytes"] == 4 * 64 * 16384 * 4
    assert full["temp_bytes"] > full["logits_bytes"]  # the logits and their gradient
    assert chunked["temp_bytes"] < full["temp_bytes"] / 4  # 32 positions' logits (and gradient) at a time
    np.testing.assert_allclose(chunked["loss"], full["loss"], rtol=1e-5)
