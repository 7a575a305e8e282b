"""LLaMA-style causal LMs in Flax linen, with HF checkpoint import/export: LLaMA 1/2/3.x, Mistral,
Qwen2/2.5, Qwen3, Gemma, Gemma 2 and Gemma 3 (text) are one module with options (`Variant`).

RMSNorm, rotary position embeddings (HF's rotate-half layout; rope types "default",
"linear" and "llama3"), grouped-query attention (`num_key_value_heads`) and a gated MLP
(SwiGLU, or GeGLU for Gemma). The LM head is its own Dense unless `tie_word_embeddings`.
The families differ only by `Variant` (norm (1 + w), q/k norms, norms after attention and MLP,
embedding scale, attention scale and soft-capping, q/k/v bias) and by per-layer sliding windows
(`layer_types`, each layer "full_attention" or "sliding_attention", with its own rope base for
Gemma 3's local layers). Param tree, the same logical names in every family:

    embed_tokens/embedding, norm, lm_head (untied only)
    layer_{i}/attention/{query,key,value,attn_out}, layer_{i}/attn_norm (HF input_layernorm),
    layer_{i}/{gate,up,down}, layer_{i}/mlp_norm (HF post_attention_layernorm; Gemma 2/3's
    pre_feedforward_layernorm), and where the family has them
    layer_{i}/attention/{query_norm,key_norm} (q_norm, k_norm), layer_{i}/attn_post_norm (Gemma 2/3's
    post_attention_layernorm), layer_{i}/mlp_post_norm (post_feedforward_layernorm)
    (scan_layers: the layer_{i} subtrees are one `layer` subtree, leaves stacked (L, ...); it needs
    every layer of one kind, so Gemma 2/3's interleaved sliding and global layers are refused)
"""

from __future__ import annotations

import dataclasses
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
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a family changes in the LLaMA block (the defaults are LLaMA's).

    norm_offset: RMSNorm multiplies by (norm_offset + w) (Gemma: 1, weights stored around 0).
    qk_norm: RMSNorm over head_dim on queries and keys before rope (Qwen3, Gemma 3).
    post_norms: RMSNorm on the attention and MLP outputs before each residual add (Gemma 2/3).
    embed_scale: embeddings multiplied by sqrt(hidden) in the model's dtype (Gemma).
    attn_scale: query scale (None: head_dim ** -0.5; Gemma: query_pre_attn_scalar ** -0.5).
    attn_softcap, final_softcap: cap * tanh(x / cap) on attention scores / logits (Gemma 2).
    qkv_bias: bias on query/key/value only (Qwen2), beside `attention_bias` (all four).
    """

    norm_offset: float = 0.0
    qk_norm: bool = False
    post_norms: bool = False
    embed_scale: bool = False
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    qkv_bias: bool = False


LLAMA = Variant()


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale. With `offset` (Gemma's
    RMSNorm) the scale is (offset + w), applied in float32 before the cast, and w starts at 0."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    offset: float = 0.0
    axis: str | None = "embed"

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros_init() if self.offset else nn.initializers.ones_init()
        scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis,)), (x.shape[-1],),
                           self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (y * (self.offset + jnp.asarray(scale, jnp.float32))).astype(self.dtype)
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
    variant: Variant = LLAMA
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x, bias, position_ids, layer_cache, cache_index, deterministic):
        batch, length, width = x.shape
        v = self.variant
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std, use_bias=self.use_bias)
        qkv = {**kw, "use_bias": self.use_bias or v.qkv_bias}

        def project(name, heads):
            y = common.dense(heads * self.head_dim, ("embed", "heads"), name=name, **qkv)(x)
            y = y.reshape(batch, length, heads, self.head_dim)
            if v.qk_norm and name != "value":
                y = RMSNorm(self.eps, self.dtype, self.param_dtype, v.norm_offset, None, name=f"{name}_norm")(y)
            return y

        query = apply_rope(project("query", self.num_heads), position_ids, self.inv_freq)
        key = apply_rope(project("key", self.num_kv_heads), position_ids, self.inv_freq)
        value = project("value", self.num_kv_heads)
        if layer_cache is not None:
            layer_cache, key, value = decoding.write_cache(layer_cache, cache_index, key, value)
        dropout = nn.Dropout(self.dropout_rate, deterministic=deterministic)
        scale = self.head_dim ** -0.5 if v.attn_scale is None else v.attn_scale
        out = decoding.attend(query, key, value, bias, scale, dropout, softcap=v.attn_softcap)
        return common.dense(width, ("heads", "embed"), name="attn_out", **kw)(out), layer_cache


class LlamaBlock(nn.Module):
    """x + attn(rms(x)), then x + down(silu(gate(rms(x))) * up(rms(x))); with `post_norms`
    (Gemma 2/3) each branch's output is normalised again before the residual add."""

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
    variant: Variant = LLAMA

    @nn.compact
    def __call__(self, x, bias, position_ids, layer_cache, cache_index, deterministic):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        v = self.variant
        norm = dict(offset=v.norm_offset, **kw)
        h = RMSNorm(self.eps, name="attn_norm", **norm)(x)
        h, layer_cache = LlamaAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.inv_freq, self.attention_bias,
            self.attention_dropout, self.init_std, name="attention", variant=v, eps=self.eps, **kw,
        )(h, bias, position_ids, layer_cache, cache_index, deterministic)
        if v.post_norms:
            h = RMSNorm(self.eps, name="attn_post_norm", **norm)(h)
        x = x + h
        h = RMSNorm(self.eps, name="mlp_norm", **norm)(x)
        mlp = dict(init_std=self.init_std, use_bias=self.mlp_bias, **kw)
        gate = common.dense(self.inner_dim, ("embed", "mlp"), name="gate", **mlp)(h)
        up = common.dense(self.inner_dim, ("embed", "mlp"), name="up", **mlp)(h)
        h = common.activation(self.activation)(gate) * up
        h = common.dense(x.shape[-1], ("mlp", "embed"), name="down", **mlp)(h)
        if v.post_norms:
            h = RMSNorm(self.eps, name="mlp_post_norm", **norm)(h)
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
    variant: Variant = LLAMA
    layer_types: tuple[str, ...] | None = None  # per layer FULL or SLIDING; None: all FULL
    sliding_window: int | None = None  # a SLIDING layer's query sees the keys of its last `sliding_window` slots
    local_inv_freq: tuple[float, ...] | None = None  # a SLIDING layer's rope (Gemma 3's local base); None: inv_freq
    scan_layers: bool = False  # one nn.scan over the layers (all of one kind: see build)

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """Empty KV cache for `batch_size` sequences of at most `max_length` tokens."""
        return decoding.init_cache(batch_size, max_length, self.num_layers, self.num_kv_heads, self.head_dim,
                                   self.dtype, stacked=self.scan_layers)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, deterministic=True):
        """The LM head's input (batch, T, width): the final norm's output."""
        return self(input_ids, attention_mask, position_ids, deterministic=deterministic, head=False)

    def logits_from_hidden(self, hidden):
        """The LM head alone: logits (..., vocab) of `hidden_states` (..., width), e.g. a chunk of
        them at a time (`vera_jax.train.losses`)."""
        return self(None, hidden=hidden)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, deterministic=True, *,
                 hidden=None, head=True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = common.embed(self.vocab_size, self.width, ("vocab", "embed"), name="embed_tokens",
                             init_std=self.init_std, **kw)
        if hidden is not None:
            return self._head(embed, hidden, kw)
        bias, position_ids = decoding.attention_inputs(input_ids, attention_mask, position_ids, cache)
        x = embed(input_ids)
        if self.variant.embed_scale:
            x = x * jnp.asarray(self.width ** 0.5, x.dtype)
        layer_types = self.layer_types or (FULL,) * self.num_layers
        biases = {FULL: bias}
        if SLIDING in layer_types:
            biases[SLIDING] = decoding.sliding_window_bias(bias, 0 if cache is None else cache["index"],
                                                           self.sliding_window)
        rope = {FULL: self.inv_freq, SLIDING: self.local_inv_freq or self.inv_freq}
        block_cls = nn.remat(LlamaBlock, static_argnums=(6,)) if self.remat else LlamaBlock
        new_cache = None if cache is None else {"index": cache["index"] + input_ids.shape[1]}
        if self.scan_layers and len(set(layer_types)) > 1:
            raise ValueError("scan_layers: every layer must be of one kind (sliding or global) to run under one "
                             f"scan; this model mixes them ({list(layer_types)}): load it with scan_layers=False")
        names = [common.SCANNED] if self.scan_layers else [f"layer_{i}" for i in range(self.num_layers)]
        for i, name in enumerate(names):
            kind = layer_types[i]
            block = block_cls(self.num_heads, self.num_kv_heads, self.head_dim, self.inner_dim, rope[kind],
                              self.activation, self.eps, self.attention_bias, self.mlp_bias, self.attention_dropout,
                              self.init_std, name=name, variant=self.variant, **kw)
            if self.scan_layers and cache is None:
                x = common.scan_blocks(block, self.num_layers, x, biases[kind], position_ids, None, None,
                                       deterministic)
            elif self.scan_layers:
                x, new_cache[name] = common.scan_blocks(block, self.num_layers, x, biases[kind], position_ids,
                                                        common.LAYER_CACHE, cache["index"], deterministic,
                                                        cache=cache[name])
            elif cache is None:
                x, _ = block(x, biases[kind], position_ids, None, None, deterministic)
            else:
                x, new_cache[name] = block(x, biases[kind], position_ids, cache[name], cache["index"],
                                           deterministic)
        x = RMSNorm(self.eps, name="norm", offset=self.variant.norm_offset, **kw)(x)
        logits = self._head(embed, x, kw) if head else x
        return logits if cache is None else (logits, new_cache)

    def _head(self, embed, x, kw):
        """Logits of the final norm's output `x`, soft-capped where the variant caps them (Gemma 2):
        the full forward and the chunked loss (`logits_from_hidden`) both end here."""
        if self.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = common.dense(self.vocab_size, ("embed", "vocab"), name="lm_head", use_bias=False,
                                  init_std=self.init_std, **kw)(x)
        if self.variant.final_softcap is not None:
            cap = self.variant.final_softcap
            logits = jnp.tanh(logits / cap) * cap
        return logits


# model_type -> (the HF causal-LM class, tie_word_embeddings default); every one is built here.
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", False), "mistral": ("MistralForCausalLM", False),
    "qwen2": ("Qwen2ForCausalLM", False), "qwen3": ("Qwen3ForCausalLM", False),
    "gemma": ("GemmaForCausalLM", True), "gemma2": ("Gemma2ForCausalLM", True),
    "gemma3_text": ("Gemma3ForCausalLM", True),
}
GEMMAS = ("gemma", "gemma2", "gemma3_text")


def variant(hf_config: dict) -> Variant:
    """The `Variant` of an HF config's `model_type` (and its soft-capping / scaling fields)."""
    model_type = hf_config.get("model_type", "llama")
    if model_type in ("llama", "mistral"):
        return LLAMA
    if model_type == "qwen2":
        return Variant(qkv_bias=True)
    if model_type == "qwen3":
        return Variant(qk_norm=True)
    if model_type == "gemma":
        return Variant(norm_offset=1.0, embed_scale=True)
    if model_type in ("gemma2", "gemma3_text"):
        return Variant(norm_offset=1.0, qk_norm=model_type == "gemma3_text", post_norms=True, embed_scale=True,
                       attn_scale=float(hf_config.get("query_pre_attn_scalar", 256)) ** -0.5,
                       attn_softcap=hf_config.get("attn_logit_softcapping"),
                       final_softcap=hf_config.get("final_logit_softcapping"))
    raise ValueError(f"llama family: model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")


def layer_types(hf_config: dict) -> tuple[str, ...] | None:
    """Each layer's attention ("full_attention" | "sliding_attention") as transformers derives it when
    config.json has no `layer_types`; None when every layer is global."""
    model_type, n = hf_config.get("model_type", "llama"), hf_config["num_hidden_layers"]
    window = hf_config.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not hf_config.get("use_sliding_window", False):
        window = None
    if hf_config.get("layer_types"):
        kinds = tuple(hf_config["layer_types"])
        bad = sorted(set(kinds) - {FULL, SLIDING})
        if bad or len(kinds) != n:
            raise ValueError(f"llama config: layer_types must list {n} of {[FULL, SLIDING]}, got {list(kinds)}")
    elif model_type == "gemma2":
        kinds = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(n))
    elif model_type == "gemma3_text":
        pattern = hf_config.get("sliding_window_pattern", 6)
        kinds = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))
    elif model_type == "mistral":
        kinds = (SLIDING,) * n if window is not None else (FULL,) * n
    elif model_type in ("qwen2", "qwen3"):
        first = hf_config.get("max_window_layers", 28)
        kinds = tuple(SLIDING if window is not None and i >= first else FULL for i in range(n))
    else:
        kinds = (FULL,) * n
    if SLIDING not in kinds:
        return None
    if not window:
        raise ValueError(f"llama config: layer_types has sliding_attention layers but sliding_window is {window!r}")
    return kinds


def _rope_config(hf_config: dict, kind: str) -> dict:
    """The rope fields for one layer kind: Gemma 3 keeps one set per kind (`rope_parameters[kind]`, or
    legacy rope_theta / rope_local_base_freq); the other families one set for all layers."""
    rope = hf_config.get("rope_parameters") or {}
    if hf_config.get("model_type") != "gemma3_text":
        return hf_config
    if FULL in rope or SLIDING in rope:
        return {"rope_parameters": rope.get(kind) or {"rope_theta": 1e6 if kind == FULL else 1e4}}
    if kind == SLIDING:
        return {"rope_theta": hf_config.get("rope_local_base_freq", 10000.0)}
    return {"rope_theta": hf_config.get("rope_theta", 1e6), "rope_scaling": hf_config.get("rope_scaling")}


def build(hf_config: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, architecture: str | None = None,
          remat: bool = False, scan_layers: bool = False) -> LlamaForCausalLM:
    """The causal LM of an HF config.json dict (`model_type` one of `ARCHITECTURES`)."""
    model_type = hf_config.get("model_type", "llama")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"llama family: model_type {model_type!r} is not supported; supported: "
                         f"{sorted(ARCHITECTURES)}")
    known, tied = ARCHITECTURES[model_type]
    if (architecture or known) != known:
        raise ValueError(f"{model_type} supports architecture {known!r}, got {architecture!r}")
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"llama config: num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv_heads}")
    if hf_config.get("pretraining_tp", 1) != 1:
        raise ValueError("llama config field pretraining_tp != 1 is not supported")
    if hf_config.get("use_bidirectional_attention"):
        raise ValueError("llama config field use_bidirectional_attention=True (an encoder) is not supported")
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    activation = hf_config.get("hidden_activation") or hf_config.get("hidden_act", "silu")
    common.activation(activation)
    kinds = layer_types(hf_config)
    local = rope_frequencies(_rope_config(hf_config, SLIDING), head_dim) if model_type == "gemma3_text" else None
    return LlamaForCausalLM(
        vocab_size=hf_config["vocab_size"], width=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"], num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        inner_dim=hf_config["intermediate_size"], inv_freq=rope_frequencies(_rope_config(hf_config, FULL), head_dim),
        activation=activation, eps=hf_config.get("rms_norm_eps", 1e-6),
        attention_bias=hf_config.get("attention_bias", False), mlp_bias=hf_config.get("mlp_bias", False),
        attention_dropout=hf_config.get("attention_dropout", 0.0),
        tie_word_embeddings=hf_config.get("tie_word_embeddings", tied),
        init_std=hf_config.get("initializer_range", 0.02), dtype=dtype, param_dtype=param_dtype, remat=remat,
        variant=variant(hf_config), layer_types=kinds,
        sliding_window=hf_config.get("sliding_window") if kinds else None, local_inv_freq=local,
        scan_layers=scan_layers)


def dummy_inputs(hf_config: dict) -> tuple:
    """Positional inputs for `model.init`."""
    return (jnp.zeros((1, 2), jnp.int32),)


def _tied(hf_config: dict) -> bool:
    return hf_config.get("tie_word_embeddings", ARCHITECTURES.get(hf_config.get("model_type", "llama"),
                                                                  (None, False))[1])


def _entries(hf_config: dict) -> list[common.Entry]:
    E = common.Entry
    v = variant(hf_config)
    out = [E(("embed_tokens", "embedding"), "model.embed_tokens.weight"), E(("norm", "scale"), "model.norm.weight")]
    if not _tied(hf_config):
        out += common.linear(("lm_head",), "lm_head", bias=False)
    attn_bias, mlp_bias = hf_config.get("attention_bias", False), hf_config.get("mlp_bias", False)
    norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    if v.post_norms:
        norms = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}
    for i in range(hf_config["num_hidden_layers"]):
        ours, hf = f"layer_{i}", f"model.layers.{i}."
        for name, hf_norm in norms.items():
            out.append(E((ours, name, "scale"), hf + hf_norm + ".weight"))
        if v.qk_norm:
            out.append(E((ours, "attention", "query_norm", "scale"), hf + "self_attn.q_norm.weight"))
            out.append(E((ours, "attention", "key_norm", "scale"), hf + "self_attn.k_norm.weight"))
        for name in ("query", "key", "value", "attn_out"):
            bias = attn_bias or (v.qkv_bias and name != "attn_out")
            out += common.linear((ours, "attention", name), hf + HF_MODULE_NAMES[name], bias=bias)
        for name in ("gate", "up", "down"):
            out += common.linear((ours, name), hf + HF_MODULE_NAMES[name], bias=mlp_bias)
    return out


def params_from_hf(tensors: dict[str, np.ndarray], hf_config: dict, *, finish=None) -> dict:
    """HF *ForCausalLM / *Model tensors -> params (a tied checkpoint's lm_head copy is ignored).

    LlamaModel checkpoints lack the `model.` prefix; it is added so errors use one naming.
    `finish` is applied to each leaf as it is made (`common.params_from_entries`).
    """
    ignore = IGNORED + ((r"^lm_head\.weight$",) if _tied(hf_config) else ())
    return common.params_from_entries(
        {k if k.startswith(("model.", "lm_head.")) else "model." + k: v for k, v in tensors.items()},
        _entries(hf_config),
        common.abstract_params(build(hf_config), dummy_inputs(hf_config)), ignore=ignore, finish=finish)


def params_to_hf(params: dict, hf_config: dict) -> dict[str, np.ndarray]:
    """Params -> HF *ForCausalLM tensors."""
    return common.params_to_entries(params, _entries(hf_config))
