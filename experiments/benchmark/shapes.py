"""The benchmarked models' shapes (a bundled HF config with depth/width overrides), their random
batches and the loss every method trains."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from vera_jax.models import hub

# A small LLaMA (not a released checkpoint): LLaMA's layout at a size a CPU can train.
LLAMA_SMALL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "initializer_range": 0.02,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
    "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
    "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
}

# model name -> VeRA rank the paper uses for it (VeRA Tables 1, 2 and Section 4.3).
PAPER_RANK = {"roberta-base": 1024, "roberta-large": 256, "gpt2-medium": 1024, "llama-small": 1024}
# model_type -> (our embedding module, HF module names PEFT targets for query/value)
FAMILY = {
    "roberta": ("embeddings", ["query", "value"]),
    "gpt2": ("wte", ["c_attn"]),
    "llama": ("embed_tokens", ["q_proj", "v_proj"]),
}
LAYER_KEY = {"roberta": "num_hidden_layers", "gpt2": "n_layer", "llama": "num_hidden_layers"}


def _base_config(name: str) -> dict:
    return dict(LLAMA_SMALL) if name == "llama-small" else hub.bundled_config(name)


def model_config(name: str, layers: int | None = None, hidden: int | None = None) -> dict:
    """HF config dict for `name` (RoBERTa with a 2-class head), with depth/width overrides.

    `hidden` also sets the MLP width (4x; LLaMA 8/3x rounded up to 8) and one head per 64 features."""
    if name not in PAPER_RANK:
        raise ValueError(f"model: {name!r} is not one of {sorted(PAPER_RANK)}")
    cfg = _base_config(name)
    kind = cfg["model_type"]
    if kind == "roberta":
        cfg = hub.task_config(cfg, num_labels=2)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers: expected >= 1, got {layers}")
        cfg[LAYER_KEY[kind]] = layers
    if hidden is not None:
        heads = max(1, hidden // 64)
        if hidden < 8 or hidden % heads:
            raise ValueError(f"hidden: {hidden} must be >= 8 and divisible into {heads} heads of 64")
        if kind == "gpt2":
            cfg.update(n_embd=hidden, n_head=heads)
        else:
            cfg.update(hidden_size=hidden, num_attention_heads=heads,
                       intermediate_size=4 * hidden if kind == "roberta" else -(-8 * hidden // 24) * 8)
        if kind == "llama":
            cfg["num_key_value_heads"] = max(1, heads // 2)
    return cfg


def hidden_size(cfg: dict) -> int:
    return cfg.get("hidden_size", cfg.get("n_embd"))


def shape_summary(cfg: dict, name: str) -> dict:
    """What ran: the model, its depth next to the full model's, and its width."""
    kind = cfg["model_type"]
    return {"model": name, "model_type": kind, "layers": cfg[LAYER_KEY[kind]],
            "full_layers": _base_config(name)[LAYER_KEY[kind]], "hidden": hidden_size(cfg)}


def make_batch(cfg: dict, batch: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids (never RoBERTa's pad id, so no position is masked) and fixed labels: class
    labels for RoBERTa's classification head, next tokens for the causal LMs."""
    if cfg["model_type"] == "roberta" and seq + cfg["pad_token_id"] + 1 > cfg["max_position_embeddings"]:
        raise ValueError(f"seq: {seq} is longer than RoBERTa's {cfg['max_position_embeddings'] - 2} positions")
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg["vocab_size"], (batch, seq), dtype=np.int32)
    if cfg["model_type"] == "roberta":
        labels = rng.integers(0, 2, (batch,), dtype=np.int32)
    else:
        labels = rng.integers(0, cfg["vocab_size"], (batch, seq), dtype=np.int32)
    return ids, labels


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
