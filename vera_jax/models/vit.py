"""Vision Transformer matching Hugging Face `ViTModel` / `ViTForImageClassification`.

Images are NHWC floats (already normalised as the HF image processor does). The patch
embedding is a Dense over flattened (P, P, C) patches, equal to HF's stride-P Conv2d, so
every kernel in the model is 2-D. Pre-LayerNorm blocks; the classifier reads the [CLS]
token after the final LayerNorm. `ViTModel` returns the final hidden states (HF's pooler,
present in `google/vit-*-in21k` checkpoints, is ignored: ViTForImageClassification does
not use it). `interpolate_position_embeddings` adapts a checkpoint to another image size.
Param tree:

    embeddings/{cls_token, position_embeddings, patch_embed}
    layer_{i}/layernorm_before, layer_{i}/attention/{query,key,value,attn_out},
    layer_{i}/layernorm_after, layer_{i}/mlp_in, layer_{i}/mlp_out
    layernorm, classifier (ViTForImageClassification only)
    (scan_layers: the layer_{i} subtrees are one `layer` subtree, leaves stacked (L, ...))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vera_jax.models import common

BASE_ARCHITECTURES = ("ViTModel",)
CLASSIFICATION_ARCHITECTURE = {"vit": "ViTForImageClassification"}

# Ours -> HF module suffix under `vit.encoder.layer.{i}.`. PEFT matches target_modules by
# suffix, so "output.dense" (mlp_out) also hits "attention.output.dense"; give PEFT a regex there.
HF_MODULE_NAMES = {
    "query": "attention.attention.query",
    "key": "attention.attention.key",
    "value": "attention.attention.value",
    "attn_out": "attention.output.dense",
    "mlp_in": "intermediate.dense",
    "mlp_out": "output.dense",
    "classifier": "classifier",
}

IGNORED = (r"^pooler\.",)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    qkv_bias: bool
    hidden_dropout: float
    attention_dropout: float
    initializer_range: float
    num_labels: int | None  # None: no head, the module returns hidden states

    @classmethod
    def from_hf(cls, hf_config: dict) -> "ViTConfig":
        if hf_config["model_type"] != "vit":
            raise ValueError(f"model_type {hf_config['model_type']!r} is not vit")
        arch = architecture(hf_config)
        if hf_config["image_size"] % hf_config["patch_size"]:
            raise ValueError(f"image_size {hf_config['image_size']} is not a multiple of patch_size")
        return cls(
            image_size=hf_config["image_size"],
            patch_size=hf_config["patch_size"],
            num_channels=hf_config.get("num_channels", 3),
            hidden_size=hf_config["hidden_size"],
            num_layers=hf_config["num_hidden_layers"],
            num_heads=hf_config["num_attention_heads"],
            intermediate_size=hf_config["intermediate_size"],
            hidden_act=hf_config.get("hidden_act", "gelu"),
            layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
            qkv_bias=hf_config.get("qkv_bias", True),
            hidden_dropout=hf_config.get("hidden_dropout_prob", 0.0),
            attention_dropout=hf_config.get("attention_probs_dropout_prob", 0.0),
            initializer_range=hf_config.get("initializer_range", 0.02),
            num_labels=common.num_labels(hf_config) if arch == "ViTForImageClassification" else None,
        )


def architecture(hf_config: dict) -> str:
    return common.architecture(hf_config, "ViTModel", BASE_ARCHITECTURES + tuple(CLASSIFICATION_ARCHITECTURE.values()))


class Embeddings(nn.Module):
    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool):
        c = self.config
        b, h, w, ch = pixel_values.shape
        if (h, w, ch) != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(f"expected images (batch, {c.image_size}, {c.image_size}, {c.num_channels}) NHWC, "
                             f"got {pixel_values.shape}")
        p = c.patch_size
        patches = pixel_values.reshape(b, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (h // p) * (w // p), p * p * ch)
        x = common.dense(c.hidden_size, ("patch", "embed"), name="patch_embed", dtype=self.dtype,
                         param_dtype=self.param_dtype, init_std=c.initializer_range)(patches)
        init = nn.initializers.normal(c.initializer_range)
        axes = (None, None, "embed")
        cls_token = self.param("cls_token", nn.with_logical_partitioning(init, axes), (1, 1, c.hidden_size),
                               self.param_dtype)
        pos = self.param("position_embeddings", nn.with_logical_partitioning(init, axes),
                         (1, patches.shape[1] + 1, c.hidden_size), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, c.hidden_size)).astype(x.dtype), x], axis=1)
        x = x + pos.astype(x.dtype)
        return nn.Dropout(c.hidden_dropout)(x, deterministic=deterministic)


class Layer(nn.Module):
    """Pre-LayerNorm transformer block."""

    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = nn.Dropout(c.hidden_dropout)
        h = common.layer_norm(c.layer_norm_eps, name="layernorm_before", **kw)(x)
        h = common.SelfAttention(c.num_heads, c.attention_dropout, c.initializer_range, use_bias=c.qkv_bias,
                                 name="attention", **kw)(h, None, deterministic)
        x = x + drop(h, deterministic=deterministic)
        h = common.layer_norm(c.layer_norm_eps, name="layernorm_after", **kw)(x)
        h = common.dense(c.intermediate_size, ("embed", "mlp"), name="mlp_in", init_std=c.initializer_range, **kw)(h)
        h = common.activation(c.hidden_act)(h)
        h = common.dense(c.hidden_size, ("mlp", "embed"), name="mlp_out", init_std=c.initializer_range, **kw)(h)
        return x + drop(h, deterministic=deterministic)


class ViT(nn.Module):
    """ViT encoder; logits from the [CLS] token when `config.num_labels` is set. `scan_layers`
    runs the blocks under one nn.scan (`common.scan_blocks`)."""

    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Embeddings(c, name="embeddings", **kw)(pixel_values.astype(self.dtype), deterministic)
        block = nn.remat(Layer, static_argnums=(2,)) if self.remat else Layer
        if self.scan_layers:
            x = common.scan_blocks(block(c, name=common.SCANNED, **kw), c.num_layers, x, deterministic)
        else:
            for i in range(c.num_layers):
                x = block(c, name=f"layer_{i}", **kw)(x, deterministic)
        x = common.layer_norm(c.layer_norm_eps, name="layernorm", **kw)(x)
        if c.num_labels is None:
            return x
        return common.dense(c.num_labels, ("embed", None), name="classifier", init_std=c.initializer_range,
                            **kw)(x[:, 0])


def build(hf_config: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, architecture: str | None = None,
          remat: bool = False, scan_layers: bool = False) -> ViT:
    if architecture is not None:
        hf_config = {**hf_config, "architectures": [architecture]}
    return ViT(ViTConfig.from_hf(hf_config), dtype=dtype, param_dtype=param_dtype, remat=remat,
               scan_layers=scan_layers)


def dummy_inputs(hf_config: dict) -> tuple:
    c = ViTConfig.from_hf(hf_config)
    return (jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32),)


def interpolate_position_embeddings(params: dict, hf_config: dict, image_size: int) -> tuple[dict, dict]:
    """(params, hf_config) for square images of `image_size` pixels: the patch-grid position
    embeddings resized as transformers' `ViTEmbeddings.interpolate_pos_encoding` does (torch
    bicubic, align_corners=False), so `build(new_config)` with the new params computes what HF's
    `ViTModel(pixel_values, interpolate_pos_encoding=True)` does at that size."""
    config = {**hf_config, "image_size": image_size}
    old, new = (ViTConfig.from_hf(c) for c in (hf_config, config))
    if new.image_size == old.image_size:
        return params, config
    pos = params["embeddings"]["position_embeddings"]
    g, n = old.image_size // old.patch_size, new.image_size // new.patch_size
    m = _bicubic_matrix(g, n)
    pos64 = np.asarray(pos, np.float64)
    grid = np.einsum("Hh,Ww,hwd->HWd", m, m, pos64[0, 1:].reshape(g, g, -1)).reshape(1, n * n, -1)
    resized = np.concatenate([pos64[:, :1], grid], axis=1)
    embeddings = {**params["embeddings"], "position_embeddings": jnp.asarray(resized, pos.dtype)}
    return {**params, "embeddings": embeddings}, config


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's 1-D bicubic resize: align_corners=False, A = -0.75, taps
    beyond the edge clamped to it."""
    a = -0.75
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src)
    t = src - base

    def near(x):  # taps at |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # taps at 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    m = np.zeros((n_out, n_in))
    for tap, w in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
        np.add.at(m, (np.arange(n_out), np.clip(base + tap - 1, 0, n_in - 1).astype(int)), w)
    return m


def _entries(c: ViTConfig) -> list[common.Entry]:
    E = common.Entry
    out = [
        E(("embeddings", "cls_token"), "embeddings.cls_token"),
        E(("embeddings", "position_embeddings"), "embeddings.position_embeddings"),
        E(("embeddings", "patch_embed", "kernel"), "embeddings.patch_embeddings.projection.weight", "conv_patches"),
        E(("embeddings", "patch_embed", "bias"), "embeddings.patch_embeddings.projection.bias"),
        *common.norm(("layernorm",), "layernorm"),
    ]
    for i in range(c.num_layers):
        ours, hf = f"layer_{i}", f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            out += common.linear((ours, "attention", name), hf + HF_MODULE_NAMES[name], bias=c.qkv_bias)
        out += common.linear((ours, "attention", "attn_out"), hf + HF_MODULE_NAMES["attn_out"])
        out += common.linear((ours, "mlp_in"), hf + HF_MODULE_NAMES["mlp_in"])
        out += common.linear((ours, "mlp_out"), hf + HF_MODULE_NAMES["mlp_out"])
        out += common.norm((ours, "layernorm_before"), hf + "layernorm_before")
        out += common.norm((ours, "layernorm_after"), hf + "layernorm_after")
    if c.num_labels is not None:
        out += common.linear(("classifier",), "classifier")
    return out


def params_from_hf(tensors: dict[str, np.ndarray], hf_config: dict, *, head_seed: int = 0, finish=None) -> dict:
    """HF ViTModel / ViTForImageClassification state dict -> params.

    A classifier absent from the checkpoint (a ViTModel checkpoint loaded for
    classification) is initialised as `build(hf_config).init(jax.random.key(head_seed))`
    would. Ignored checkpoint tensors: `IGNORED` (the unused pooler).
    `finish` is applied to each leaf as it is made (`common.params_from_entries`).
    """
    c = ViTConfig.from_hf(hf_config)
    module = ViT(c)
    inputs = dummy_inputs(hf_config)
    heads = ("classifier",) if c.num_labels is not None else ()
    return common.params_from_entries(
        common.strip_prefix(tensors, "vit."),
        _entries(c),
        common.abstract_params(module, inputs),
        ignore=IGNORED,
        fresh={h: (lambda h=h: common.init_subtrees(module, inputs, [h], head_seed)[h]) for h in heads},
        shape_info={"conv_patches": (c.patch_size, c.num_channels)},
        finish=finish,
    )


def params_to_hf(params: dict, hf_config: dict) -> dict[str, np.ndarray]:
    c = ViTConfig.from_hf(hf_config)
    tensors = common.params_to_entries(params, _entries(c), {"conv_patches": (c.patch_size, c.num_channels)})
    if c.num_labels is None:
        return tensors
    return {k if k.startswith("classifier") else "vit." + k: v for k, v in tensors.items()}
