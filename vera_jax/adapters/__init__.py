"""VeRA and LoRA as pure transforms of a Flax param tree (see vera_jax/__init__.py for the API)."""

# ruff: noqa: F401  (re-exports; vera_jax/__init__.py lists the public API)

from .config import FullConfig, HeadConfig, LoraConfig, VeraConfig
from .core import Adapted, apply_full, apply_head, apply_lora, apply_vera, layer_delta, merge
from .cost import choose_path, layer_costs
from .factored import apply_adapted, apply_factored, call_adapted
from .files import AdapterFileError, load_adapter, save_adapter
from .flax_nnx import nnx_merge
from .projections import fingerprint, make_projections
from .split import combine, count_trainable, optax_labels, partition
from .targets import LayerSpec, find_targets
