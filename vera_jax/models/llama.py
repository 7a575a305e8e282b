"""LLaMA causal LM (HF `LlamaForCausalLM`) in Flax linen, with HF checkpoint import/export.

RMSNorm, rotary position embeddings (HF's rotate-half layout; rope types "default",
"linear" and "llama3"), grouped-query attention (`num_key_value_heads`) and a SwiGLU
MLP. The LM head is its own Dense unless `tie_word_embeddings`. Param tree:

    embed_tokens/embedding, norm, lm_head (untied only)
    layer_{i}/attention/{query,key,value,attn_out}, layer_{i}/attn_norm (HF input_layernorm),
    layer_{i}/{gate,up,down}, layer_{i}/mlp_norm (HF post_attention_layernorm)
    (scan_layers: the layer_{i} subtrees are one `layer` subtree, leaves stacked (L, ...))
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vera_jax.models import common, decoding

# Ours -> HF module suffix under `model.layers.{i}.`.
HF_MODULE_NAMES = {
    "query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
IGNORED = (r"rotary_emb\.inv_freq$",)  # a buffer older checkpoints saved


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return jnp.asarray(scale, self.dtype) * y.astype(self.dtype)


def rope_frequencies(hf_config: dict, head_dim: int) -> tuple[float, ...]:
    """Inverse rotary frequencies (head_dim / 2,) from `rope_parameters` (or legacy rope_theta/rope_scaling)."""
    rope = dict(hf_config.get("rope_parameters") or {})
    if not rope:
        rope = {"rope_theta": hf_config.get("rope_theta", 10000.0), **(hf_config.get("rope_scaling") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    inv_freq = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope_type == "linear":
        inv_freq = inv_freq / rope["factor"]
    elif rope_type == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif rope_type != "default":
        raise ValueError(f"llama config: rope_type {rope_type!r} is not supported (default, linear, llama3)")
    return tuple(float(f) for f in inv_freq.astype(np.float32))


def apply_rope(x, position_ids, inv_freq):
    """Rotates x (B, T, heads, D) by its positions, HF rotate-half layout; angles in float32."""
    angles = position_ids[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE; with a layer cache, writes this call's keys/values first."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    inv_freq: tuple[float, ...]
    use_bias: bool
    dropout_rate: float
    init_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, bias, position_ids, layer_cache, cache_index, deterministic):
        batch, length, width = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std, use_bias=self.use_bias)

        def project(name, heads):
            y = common.dense(heads * self.head_dim, ("embed", "heads"), name=name, **kw)(x)
            return y.reshape(batch, length, heads, self.head_dim)

        query = apply_rope(project("query", self.num_heads), position_ids, self.inv_freq)
        key = apply_rope(project("key", self.num_kv_heads), position_ids, self.inv_freq)
        value = project("value", self.num_kv_heads)
        if layer_cache is not None:
            layer_cache, key, value = decoding.write_cache(layer_cache, cache_index, key, value)
        dropout = nn.Dropout(self.dropout_rate, deterministic=deterministic)
        out = decoding.attend(query, key, value, bias, self.head_dim ** -0.5, dropout)
        return common.dense(width, ("heads", "embed"), name="attn_out", **kw)(out), layer_cache


class LlamaBlock(nn.Module):
    """x + attn(rms(x)), then x + down(silu(gate(rms(x))) * up(rms(x)))."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    inner_dim: int
    inv_freq: tuple[float, ...]
    activation: str
    eps: float
    attention_bias: bool
    mlp_bias: bool
    attention_dropout: float
    init_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, bias, position_ids, layer_cache, cache_index, deterministic):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(self.eps, name="attn_norm", **kw)(x)
        h, layer_cache = LlamaAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.inv_freq, self.attention_bias,
            self.attention_dropout, self.init_std, name="attention", **kw,
        )(h, bias, position_ids, layer_cache, cache_index, deterministic)
        x = x + h
        h = RMSNorm(self.eps, name="mlp_norm", **kw)(x)
        mlp = dict(init_std=self.init_std, use_bias=self.mlp_bias, **kw)
        gate = common.dense(self.inner_dim, ("embed", "mlp"), name="gate", **mlp)(h)
        up = common.dense(self.inner_dim, ("embed", "mlp"), name="up", **mlp)(h)
        h = common.activation(self.activation)(gate) * up
        h = common.dense(x.shape[-1], ("mlp", "embed"), name="down", **mlp)(h)
        return x + h, layer_cache


class LlamaForCausalLM(nn.Module):
    """LLaMA returning next-token logits (batch, T, vocab); with `cache`, returns (logits, cache).

    `attention_mask` (1 = token, 0 = pad) is (batch, T), or (batch, cache length) with a
    cache; position ids default to counts of unmasked tokens, so left padding works.
    `scan_layers` runs the blocks under one nn.scan (`common.scan_blocks`) with a stacked cache.
    """

    vocab_size: int
    width: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    inner_dim: int
    inv_freq: tuple[float, ...]
    activation: str = "silu"
    eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """Empty KV cache for `batch_size` sequences of at most `max_length` tokens."""
        return decoding.init_cache(batch_size, max_length, self.num_layers, self.num_kv_heads, self.head_dim,
                                   self.dtype, stacked=self.scan_layers)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, deterministic=True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bias, position_ids = decoding.attention_inputs(input_ids, attention_mask, position_ids, cache)
        embed = common.embed(self.vocab_size, self.width, ("vocab", "embed"), name="embed_tokens",
                             init_std=self.init_std, **kw)
        x = embed(input_ids)
        block_cls = nn.remat(LlamaBlock, static_argnums=(6,)) if self.remat else LlamaBlock
        new_cache = None if cache is None else {"index": cache["index"] + input_ids.shape[1]}
        names = [common.SCANNED] if self.scan_layers else [f"layer_{i}" for i in range(self.num_layers)]
        for name in names:
            block = block_cls(self.num_heads, self.num_kv_heads, self.head_dim, self.inner_dim, self.inv_freq,
                              self.activation, self.eps, self.attention_bias, self.mlp_bias, self.attention_dropout,
                              self.init_std, name=name, **kw)
            if self.scan_layers and cache is None:
                x = common.scan_blocks(block, self.num_layers, x, bias, position_ids, None, None, deterministic)
            elif self.scan_layers:
                x, new_cache[name] = common.scan_blocks(block, self.num_layers, x, bias, position_ids,
                                                        common.LAYER_CACHE, cache["index"], deterministic,
                                                        cache=cache[name])
            elif cache is None:
                x, _ = block(x, bias, position_ids, None, None, deterministic)
            else:
                x, new_cache[name] = block(x, bias, position_ids, cache[name], cache["index"], deterministic)
        x = RMSNorm(self.eps, name="norm", **kw)(x)
        if self.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = common.dense(self.vocab_size, ("embed", "vocab"), name="lm_head", use_bias=False,
                                  init_std=self.init_std, **kw)(x)
        return logits if cache is None else (logits, new_cache)


def build(hf_config: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, architecture: str | None = None,
          remat: bool = False, scan_layers: bool = False) -> LlamaForCausalLM:
    """LlamaForCausalLM from an HF config.json dict (the causal LM is the only architecture)."""
    if (architecture or "LlamaForCausalLM") != "LlamaForCausalLM":
        raise ValueError(f"llama supports architecture 'LlamaForCausalLM', got {architecture!r}")
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"llama config: num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv_heads}")
    if hf_config.get("pretraining_tp", 1) != 1:
        raise ValueError("llama config field pretraining_tp != 1 is not supported")
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    activation = hf_config.get("hidden_act", "silu")
    common.activation(activation)
    return LlamaForCausalLM(
        vocab_size=hf_config["vocab_size"], width=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"], num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        inner_dim=hf_config["intermediate_size"], inv_freq=rope_frequencies(hf_config, head_dim),
        activation=activation, eps=hf_config.get("rms_norm_eps", 1e-6),
        attention_bias=hf_config.get("attention_bias", False), mlp_bias=hf_config.get("mlp_bias", False),
        attention_dropout=hf_config.get("attention_dropout", 0.0),
        tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
        init_std=hf_config.get("initializer_range", 0.02), dtype=dtype, param_dtype=param_dtype, remat=remat,
        scan_layers=scan_layers)


def dummy_inputs(hf_config: dict) -> tuple:
    """Positional inputs for `model.init`."""
    return (jnp.zeros((1, 2), jnp.int32),)


def _entries(hf_config: dict) -> list[common.Entry]:
    E = common.Entry
    out = [E(("embed_tokens", "embedding"), "model.embed_tokens.weight"), E(("norm", "scale"), "model.norm.weight")]
    if not hf_config.get("tie_word_embeddings", False):
        out += common.linear(("lm_head",), "lm_head", bias=False)
    attn_bias, mlp_bias = hf_config.get("attention_bias", False), hf_config.get("mlp_bias", False)
    for i in range(hf_config["num_hidden_layers"]):
        ours, hf = f"layer_{i}", f"model.layers.{i}."
        out.append(E((ours, "attn_norm", "scale"), hf + "input_layernorm.weight"))
        out.append(E((ours, "mlp_norm", "scale"), hf + "post_attention_layernorm.weight"))
        for name in ("query", "key", "value", "attn_out"):
            out += common.linear((ours, "attention", name), hf + HF_MODULE_NAMES[name], bias=attn_bias)
        for name in ("gate", "up", "down"):
            out += common.linear((ours, name), hf + HF_MODULE_NAMES[name], bias=mlp_bias)
    return out


def params_from_hf(tensors: dict[str, np.ndarray], hf_config: dict, *, finish=None) -> dict:
    """HF LlamaForCausalLM / LlamaModel tensors -> params (a tied checkpoint's lm_head copy is ignored).

    LlamaModel checkpoints lack the `model.` prefix; it is added so errors use one naming.
    `finish` is applied to each leaf as it is made (`common.params_from_entries`).
    """
    ignore = IGNORED + ((r"^lm_head\.weight$",) if hf_config.get("tie_word_embeddings", False) else ())
    return common.params_from_entries(
        {k if k.startswith(("model.", "lm_head.")) else "model." + k: v for k, v in tensors.items()},
        _entries(hf_config),
        common.abstract_params(build(hf_config), dummy_inputs(hf_config)), ignore=ignore, finish=finish)


def params_to_hf(params: dict, hf_config: dict) -> dict[str, np.ndarray]:
    """Params -> HF LlamaForCausalLM tensors."""
    return common.params_to_entries(params, _entries(hf_config))
