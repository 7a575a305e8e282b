"""Interoperability with the PyTorch ecosystem: HF PEFT adapter directories (VeRA and LoRA) in
both directions (VeRA also as the LoRA it exactly is), and merged Hugging Face checkpoints for serving."""

from vera_jax.interop.convert import to_lora, to_vera
from vera_jax.interop.export import export_merged
from vera_jax.interop.layout import HFLayout, hf_layout
from vera_jax.interop.peft import PeftFormatError, load_peft_adapter, save_peft_adapter

__all__ = ["HFLayout", "PeftFormatError", "export_merged", "hf_layout", "load_peft_adapter", "save_peft_adapter",
           "to_lora", "to_vera"]
