"""GPT-2 causal LM (HF `GPT2LMHeadModel`) in Flax linen, with HF checkpoint import/export.

HF fuses the attention input projection into one Conv1D `c_attn` (in, 3*d); here it is
three Dense layers `query`/`key`/`value` so adapters can target each (the importer
splits it, the exporter re-fuses it). HF Conv1D weights are already (in, out). The LM
head is tied to `wte` (no params of its own). Param tree:

    wte/embedding, wpe/embedding, ln_f
    layer_{i}/attention/{query,key,value,attn_out}, layer_{i}/attn_norm (HF ln_1),
    layer_{i}/mlp_in, layer_{i}/mlp_out, layer_{i}/mlp_norm (HF ln_2)
    (scan_layers: the layer_{i} subtrees are one `layer` subtree, leaves stacked (L, ...))
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vera_jax.models import common, decoding

# Ours -> HF module suffix under `transformer.h.{i}.`; query/key/value share HF's fused c_attn,
# so a PEFT adapter on c_attn has one (3*d)-wide output where ours has three d-wide ones.
HF_MODULE_NAMES = {
    "query": "attn.c_attn", "key": "attn.c_attn", "value": "attn.c_attn",
    "attn_out": "attn.c_proj", "mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj",
}
QKV = ("query", "key", "value")
# Non-parameter buffers older checkpoints hold, and the lm_head tied to wte.
IGNORED = (r"\.attn\.bias$", r"\.attn\.masked_bias$", r"^lm_head\.weight$")


class GPT2Attention(nn.Module):
    """Causal self-attention; with a layer cache, writes this call's keys/values into it first."""

    num_heads: int
    scale: float
    dropout_rate: float
    init_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, bias, layer_cache, cache_index, deterministic):
        batch, length, width = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std)
        query, key, value = (
            common.dense(width, ("embed", "heads"), name=name, **kw)(x).reshape(
                batch, length, self.num_heads, width // self.num_heads)
            for name in QKV)
        if layer_cache is not None:
            layer_cache, key, value = decoding.write_cache(layer_cache, cache_index, key, value)
        dropout = nn.Dropout(self.dropout_rate, deterministic=deterministic)
        out = decoding.attend(query, key, value, bias, self.scale, dropout)
        return common.dense(width, ("heads", "embed"), name="attn_out", **kw)(out), layer_cache


class GPT2Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    num_heads: int
    inner_dim: int
    activation: str
    eps: float
    attn_scale: float
    attn_pdrop: float
    resid_pdrop: float
    init_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, bias, layer_cache, cache_index, deterministic):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = nn.Dropout(self.resid_pdrop, deterministic=deterministic)
        h = common.layer_norm(self.eps, name="attn_norm", **kw)(x)
        h, layer_cache = GPT2Attention(self.num_heads, self.attn_scale, self.attn_pdrop, self.init_std,
                                       name="attention", **kw)(h, bias, layer_cache, cache_index, deterministic)
        x = x + drop(h)
        h = common.layer_norm(self.eps, name="mlp_norm", **kw)(x)
        h = common.dense(self.inner_dim, ("embed", "mlp"), name="mlp_in", init_std=self.init_std, **kw)(h)
        h = common.activation(self.activation)(h)
        h = common.dense(x.shape[-1], ("mlp", "embed"), name="mlp_out", init_std=self.init_std, **kw)(h)
        return x + drop(h), layer_cache


class GPT2LMHeadModel(nn.Module):
    """GPT-2 returning next-token logits (batch, T, vocab); with `cache`, returns (logits, cache).

    `attention_mask` (1 = token, 0 = pad) is (batch, T), or (batch, cache length) with a
    cache; position ids default to counts of unmasked tokens, so left padding works.
    `scan_layers` runs the blocks under one nn.scan (`common.scan_blocks`) with a stacked cache.
    """

    vocab_size: int
    max_positions: int
    width: int
    num_layers: int
    num_heads: int
    inner_dim: int
    activation: str = "gelu_new"
    eps: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """Empty KV cache for `batch_size` sequences of at most `max_length` tokens."""
        return decoding.init_cache(batch_size, max_length, self.num_layers, self.num_heads,
                                   self.width // self.num_heads, self.dtype, stacked=self.scan_layers)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, deterministic=True):
        """The LM head's input (batch, T, width): ln_f's output."""
        return self(input_ids, attention_mask, position_ids, deterministic=deterministic, head=False)

    def logits_from_hidden(self, hidden):
        """The LM head alone (tied to wte): logits (..., vocab) of `hidden_states` (..., width)."""
        return self(None, hidden=hidden)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, deterministic=True, *,
                 hidden=None, head=True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        wte = common.embed(self.vocab_size, self.width, ("vocab", "embed"), name="wte", init_std=self.init_std, **kw)
        if hidden is not None:
            return wte.attend(hidden)
        bias, position_ids = decoding.attention_inputs(input_ids, attention_mask, position_ids, cache)
        wpe = common.embed(self.max_positions, self.width, (None, "embed"), name="wpe", init_std=self.init_std, **kw)
        x = nn.Dropout(self.embd_pdrop, deterministic=deterministic)(wte(input_ids) + wpe(position_ids))

        block_cls = nn.remat(GPT2Block, static_argnums=(5,)) if self.remat else GPT2Block
        new_cache = None if cache is None else {"index": cache["index"] + input_ids.shape[1]}
        names = [common.SCANNED] if self.scan_layers else [f"layer_{i}" for i in range(self.num_layers)]
        for i, name in enumerate(names):  # build refuses scan_layers with scale_attn_by_inverse_layer_idx
            scale = (self.width // self.num_heads) ** -0.5 if self.scale_attn_weights else 1.0
            if self.scale_attn_by_inverse_layer_idx:
                scale /= i + 1
            block = block_cls(self.num_heads, self.inner_dim, self.activation, self.eps, scale, self.attn_pdrop,
                              self.resid_pdrop, self.init_std, name=name, **kw)
            if self.scan_layers and cache is None:
                x = common.scan_blocks(block, self.num_layers, x, bias, None, None, deterministic)
            elif self.scan_layers:
                x, new_cache[name] = common.scan_blocks(block, self.num_layers, x, bias, common.LAYER_CACHE,
                                                        cache["index"], deterministic, cache=cache[name])
            elif cache is None:
                x, _ = block(x, bias, None, None, deterministic)
            else:
                x, new_cache[name] = block(x, bias, cache[name], cache["index"], deterministic)
        x = common.layer_norm(self.eps, name="ln_f", **kw)(x)
        logits = wte.attend(x) if head else x
        return logits if cache is None else (logits, new_cache)


def build(hf_config: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, architecture: str | None = None,
          remat: bool = False, scan_layers: bool = False) -> GPT2LMHeadModel:
    """GPT2LMHeadModel from an HF config.json dict (the causal LM is the only architecture)."""
    if (architecture or "GPT2LMHeadModel") != "GPT2LMHeadModel":
        raise ValueError(f"gpt2 supports architecture 'GPT2LMHeadModel', got {architecture!r}")
    if hf_config.get("add_cross_attention"):
        raise ValueError("gpt2 config field add_cross_attention=True is not supported")
    if scan_layers and hf_config.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("gpt2 config field scale_attn_by_inverse_layer_idx=True gives each layer its own attention "
                         "scale, which scan_layers=True (one block for every layer) does not support")
    activation = hf_config.get("activation_function", "gelu_new")
    common.activation(activation)
    width = hf_config["n_embd"]
    if width % hf_config["n_head"]:
        raise ValueError(f"gpt2 config: n_embd {width} is not divisible by n_head {hf_config['n_head']}")
    return GPT2LMHeadModel(
        vocab_size=hf_config["vocab_size"], max_positions=hf_config["n_positions"], width=width,
        num_layers=hf_config["n_layer"], num_heads=hf_config["n_head"],
        inner_dim=hf_config.get("n_inner") or 4 * width, activation=activation,
        eps=hf_config.get("layer_norm_epsilon", 1e-5),
        scale_attn_weights=hf_config.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=hf_config.get("scale_attn_by_inverse_layer_idx", False),
        attn_pdrop=hf_config.get("attn_pdrop", 0.1), resid_pdrop=hf_config.get("resid_pdrop", 0.1),
        embd_pdrop=hf_config.get("embd_pdrop", 0.1), init_std=hf_config.get("initializer_range", 0.02),
        dtype=dtype, param_dtype=param_dtype, remat=remat, scan_layers=scan_layers)


def dummy_inputs(hf_config: dict) -> tuple:
    """Positional inputs for `model.init`."""
    return (jnp.zeros((1, 2), jnp.int32),)


def _fused_name(hf_name: str, part: str) -> str:
    return f"{hf_name}[{part}]"


def _entries(hf_config: dict) -> list[common.Entry]:
    """Conversion table; c_attn appears as three per-projection parts named `...c_attn.weight[query]` etc."""
    E = common.Entry
    out = [E(("wte", "embedding"), "transformer.wte.weight"), E(("wpe", "embedding"), "transformer.wpe.weight"),
           *common.norm(("ln_f",), "transformer.ln_f")]
    for i in range(hf_config["n_layer"]):
        ours, hf = f"layer_{i}", f"transformer.h.{i}."
        out += common.norm((ours, "attn_norm"), hf + "ln_1")
        out += common.norm((ours, "mlp_norm"), hf + "ln_2")
        for name in QKV:
            out.append(E((ours, "attention", name, "kernel"), _fused_name(hf + "attn.c_attn.weight", name)))
            out.append(E((ours, "attention", name, "bias"), _fused_name(hf + "attn.c_attn.bias", name)))
        for path, hf_module in (((ours, "attention", "attn_out"), "attn.c_proj"), ((ours, "mlp_in"), "mlp.c_fc"),
                                ((ours, "mlp_out"), "mlp.c_proj")):
            out.append(E(path + ("kernel",), f"{hf}{hf_module}.weight"))
            out.append(E(path + ("bias",), f"{hf}{hf_module}.bias"))
    return out


def _split_c_attn(tensors: dict) -> dict:
    """Canonical names (`transformer.` prefix, which GPT2Model checkpoints such as the original
    `gpt2` lack) with each fused c_attn tensor split into its query/key/value parts."""
    out = {}
    for name, value in tensors.items():
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            if value.shape[-1] % 3:
                raise common.CheckpointError(
                    f"checkpoint does not match the model: misshapen tensors: {name}: last dimension "
                    f"{value.shape[-1]} of fused c_attn is not divisible by 3")
            for part, piece in zip(QKV, np.split(np.asarray(value), 3, axis=-1)):
                out[_fused_name(name, part)] = piece
        else:
            out[name] = value
    return out


def params_from_hf(tensors: dict[str, np.ndarray], hf_config: dict, *, finish=None) -> dict:
    """HF GPT2LMHeadModel / GPT2Model tensors -> params (c_attn split into query/key/value);
    `finish` is applied to each leaf as it is made (`common.params_from_entries`)."""
    return common.params_from_entries(
        _split_c_attn(tensors), _entries(hf_config),
        common.abstract_params(build(hf_config), dummy_inputs(hf_config)), ignore=IGNORED, finish=finish)


def params_to_hf(params: dict, hf_config: dict) -> dict[str, np.ndarray]:
    """Params -> HF GPT2LMHeadModel tensors (query/key/value fused back into c_attn)."""
    tensors = common.params_to_entries(params, _entries(hf_config))
    out = {k: v for k, v in tensors.items() if not k.endswith("]")}
    for name in {k.rsplit("[", 1)[0] for k in tensors if k.endswith("]")}:
        out[name] = np.concatenate([tensors[_fused_name(name, part)] for part in QKV], axis=-1)
    return out
