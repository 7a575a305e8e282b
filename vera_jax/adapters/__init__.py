"""Adapters (VeRA, LoRA, DVoRA, head-only, full, or a registered one) as pure transforms of a Flax
param tree (see vera_jax/__init__.py for the API)."""

# ruff: noqa: F401  (re-exports; vera_jax/__init__.py lists the public API)

from .config import DVoraConfig, FullConfig, HeadConfig, LoraConfig, MethodConfig, VeraConfig
from .core import Adapted, attach, layer_delta, merge
from .cost import choose_path, layer_costs
from .factored import apply_adapted, apply_factored, call_adapted
from .files import AdapterFileError, load_adapter, save_adapter
from .flax_nnx import nnx_merge
from .methods import dvora, full, head, lora, vera  # registers the built-in methods
from .methods.dvora import apply_dvora
from .methods.full import apply_full
from .methods.head import apply_head
from .methods.lora import apply_lora
from .methods.registry import Method, PeftMapping, register, unregister
from .methods.registry import get as get_method
from .methods.vera import apply_vera
from .projections import fingerprint, make_projections
from .split import combine, count_trainable, optax_labels, partition
from .targets import LayerSpec, find_targets
