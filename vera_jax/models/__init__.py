"""Flax linen models (BERT/RoBERTa, ViT, GPT-2, LLaMA) and Hugging Face checkpoint import."""

from vera_jax.models.common import CheckpointError
from vera_jax.models.hub import FAMILIES, bundled_config, bundled_configs, family, from_pretrained, read_safetensors

__all__ = ["CheckpointError", "FAMILIES", "bundled_config", "bundled_configs", "family", "from_pretrained",
           "read_safetensors"]
