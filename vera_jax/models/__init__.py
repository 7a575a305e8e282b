"""Flax linen models (BERT/RoBERTa, ViT, GPT-2, LLaMA), Hugging Face checkpoint import, and generation."""

from vera_jax.models.common import CheckpointError
from vera_jax.models.generate import Decoder, ModelDecoder, as_decoder, beam_search, greedy, sample
from vera_jax.models.hub import FAMILIES, bundled_config, bundled_configs, family, from_pretrained, read_safetensors
from vera_jax.models.sampling import sample_tokens, warp_logits

__all__ = ["CheckpointError", "FAMILIES", "bundled_config", "bundled_configs", "family", "from_pretrained",
           "read_safetensors",
           "Decoder", "ModelDecoder", "as_decoder", "beam_search", "greedy", "sample", "sample_tokens", "warp_logits"]
