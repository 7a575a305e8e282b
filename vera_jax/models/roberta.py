"""BERT and RoBERTa encoders with Hugging Face's sequence-classification heads.

One linen module, `Encoder`, covers both families; they differ only in position ids
(RoBERTa counts from `pad_token_id + 1` and gives padding tokens the padding position,
computed from `input_ids != pad_token_id` exactly as HF does) and in the head:

    BertForSequenceClassification:    pooler (dense + tanh on [CLS]) -> dropout -> classifier
    RobertaForSequenceClassification: [CLS] -> dropout -> classifier/dense -> tanh -> dropout
                                      -> classifier/out_proj
    BertModel / RobertaModel (and *ForMaskedLM, *ForPreTraining checkpoints): no head,
                                      returns the last hidden states (batch, seq, hidden)

`num_labels=1` is the regression variant (STS-B): one logit per example, loss left to the
trainer. Param tree (kernels (in, out)):

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding,
    embeddings/layernorm
    layer_{i}/attention/{query,key,value,attn_out}, layer_{i}/attn_norm,
    layer_{i}/mlp_in, layer_{i}/mlp_out, layer_{i}/mlp_norm
                                            (scan_layers: one `layer` subtree, leaves stacked (L, ...))
    pooler                                  (BERT classification only)
    classifier | classifier/{dense,out_proj}  (BERT | RoBERTa classification only)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vera_jax.models import common

BASE_ARCHITECTURES = (
    "BertModel", "BertForMaskedLM", "BertForPreTraining", "BertLMHeadModel",
    "RobertaModel", "RobertaForMaskedLM", "RobertaForCausalLM",
)
CLASSIFICATION_ARCHITECTURE = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification"}

# Ours -> HF module suffix under `{bert,roberta}.encoder.layer.{i}.` (pooler and classifier: top
# level). PEFT matches target_modules by suffix, so "output.dense" (mlp_out) also hits
# "attention.output.dense"; give PEFT a regex there.
HF_MODULE_NAMES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "mlp_in": "intermediate.dense",
    "mlp_out": "output.dense",
    "pooler": "pooler.dense",
    "classifier": "classifier",
}

# Checkpoint tensors the model never uses: MLM / pretraining heads and non-persistent
# buffers older transformers versions saved. The pooler is ignored where no pooler exists.
IGNORED = (r"^lm_head\.", r"^cls\.", r"(^|\.)position_ids$", r"(^|\.)token_type_ids$")
POOLER = r"^pooler\."


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    hidden_dropout: float
    attention_dropout: float
    classifier_dropout: float
    initializer_range: float
    roberta: bool  # RoBERTa position ids (offset by pad_token_id + 1) and head
    num_labels: int | None  # None: no head, the module returns hidden states

    @classmethod
    def from_hf(cls, hf_config: dict) -> "EncoderConfig":
        model_type = hf_config["model_type"]
        if model_type not in CLASSIFICATION_ARCHITECTURE:
            raise ValueError(f"model_type {model_type!r} is not BERT or RoBERTa")
        if hf_config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {hf_config['position_embedding_type']!r} is not supported")
        arch = architecture(hf_config)
        hidden_dropout = hf_config.get("hidden_dropout_prob", 0.1)
        classifier_dropout = hf_config.get("classifier_dropout")
        return cls(
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            num_layers=hf_config["num_hidden_layers"],
            num_heads=hf_config["num_attention_heads"],
            intermediate_size=hf_config["intermediate_size"],
            hidden_act=hf_config.get("hidden_act", "gelu"),
            max_position_embeddings=hf_config["max_position_embeddings"],
            type_vocab_size=hf_config.get("type_vocab_size", 2),
            layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
            pad_token_id=hf_config.get("pad_token_id") or 0,
            hidden_dropout=hidden_dropout,
            attention_dropout=hf_config.get("attention_probs_dropout_prob", 0.1),
            classifier_dropout=hidden_dropout if classifier_dropout is None else classifier_dropout,
            initializer_range=hf_config.get("initializer_range", 0.02),
            roberta=model_type == "roberta",
            num_labels=common.num_labels(hf_config) if arch.endswith("ForSequenceClassification") else None,
        )


def architecture(hf_config: dict) -> str:
    """The HF class this config describes: `architectures[0]`, checked against what we build."""
    default = "RobertaModel" if hf_config["model_type"] == "roberta" else "BertModel"
    return common.architecture(hf_config, default, BASE_ARCHITECTURES + tuple(CLASSIFICATION_ARCHITECTURE.values()))


class Layer(nn.Module):
    """Post-LayerNorm transformer block."""

    config: EncoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = common.SelfAttention(c.num_heads, c.attention_dropout, c.initializer_range, name="attention", **kw)(
            x, mask, deterministic
        )
        h = nn.Dropout(c.hidden_dropout)(h, deterministic=deterministic)
        x = common.layer_norm(c.layer_norm_eps, name="attn_norm", **kw)(x + h)
        h = common.dense(c.intermediate_size, ("embed", "mlp"), name="mlp_in", init_std=c.initializer_range, **kw)(x)
        h = common.activation(c.hidden_act)(h)
        h = common.dense(c.hidden_size, ("mlp", "embed"), name="mlp_out", init_std=c.initializer_range, **kw)(h)
        h = nn.Dropout(c.hidden_dropout)(h, deterministic=deterministic)
        return common.layer_norm(c.layer_norm_eps, name="mlp_norm", **kw)(x + h)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    config: EncoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=c.initializer_range)
        x = common.embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), name="word_embeddings", **kw)(input_ids)
        x = x + common.embed(c.max_position_embeddings, c.hidden_size, (None, "embed"), name="position_embeddings",
                             **kw)(position_ids)
        x = x + common.embed(c.type_vocab_size, c.hidden_size, (None, "embed"), name="token_type_embeddings",
                             **kw)(token_type_ids)
        x = common.layer_norm(c.layer_norm_eps, name="layernorm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return nn.Dropout(c.hidden_dropout)(x, deterministic=deterministic)


class Encoder(nn.Module):
    """BERT/RoBERTa encoder, with the HF classification head when `config.num_labels` is set.

    Inputs are int (batch, seq); `attention_mask` is 1 for real tokens. `remat` recomputes
    each block's activations in the backward pass (nn.remat); `scan_layers` runs the blocks under
    one nn.scan (`common.scan_blocks`).
    """

    config: EncoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        longest = input_ids.shape[1] + (c.pad_token_id + 1 if c.roberta else 0)
        if longest > c.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} needs position {longest - 1}, "
                             f"beyond max_position_embeddings {c.max_position_embeddings}")
        if position_ids is None:
            if c.roberta:
                not_pad = (input_ids != c.pad_token_id).astype(jnp.int32)
                position_ids = jnp.cumsum(not_pad, axis=1) * not_pad + c.pad_token_id
            else:
                position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(c, name="embeddings", **kw)(input_ids, token_type_ids, position_ids, deterministic)
        block = nn.remat(Layer, static_argnums=(3,)) if self.remat else Layer
        if self.scan_layers:
            x = common.scan_blocks(block(c, name=common.SCANNED, **kw), c.num_layers, x, attention_mask, deterministic)
        else:
            for i in range(c.num_layers):
                x = block(c, name=f"layer_{i}", **kw)(x, attention_mask, deterministic)
        if c.num_labels is None:
            return x
        if c.roberta:
            return RobertaClassificationHead(c, name="classifier", **kw)(x[:, 0], deterministic)
        kw["init_std"] = c.initializer_range
        pooled = jnp.tanh(common.dense(c.hidden_size, ("embed", None), name="pooler", **kw)(x[:, 0]))
        pooled = nn.Dropout(c.classifier_dropout)(pooled, deterministic=deterministic)
        return common.dense(c.num_labels, ("embed", None), name="classifier", **kw)(pooled)


class RobertaClassificationHead(nn.Module):
    """HF's RobertaClassificationHead on the [CLS] (<s>) vector."""

    config: EncoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, cls, deterministic: bool):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=c.initializer_range)
        drop = nn.Dropout(c.classifier_dropout)
        h = common.dense(c.hidden_size, ("embed", None), name="dense", **kw)(drop(cls, deterministic=deterministic))
        h = drop(jnp.tanh(h), deterministic=deterministic)
        return common.dense(c.num_labels, (None, None), name="out_proj", **kw)(h)


def build(hf_config: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, architecture: str | None = None,
          remat: bool = False, scan_layers: bool = False) -> Encoder:
    """Module for `hf_config` (its `architectures[0]` unless `architecture` is given)."""
    if architecture is not None:
        hf_config = {**hf_config, "architectures": [architecture]}
    return Encoder(EncoderConfig.from_hf(hf_config), dtype=dtype, param_dtype=param_dtype, remat=remat,
                   scan_layers=scan_layers)


def dummy_inputs(hf_config: dict) -> tuple:
    return (jnp.zeros((1, 2), jnp.int32),)


def _entries(c: EncoderConfig) -> list[common.Entry]:
    E = common.Entry
    out = [
        E(("embeddings", "word_embeddings", "embedding"), "embeddings.word_embeddings.weight"),
        E(("embeddings", "position_embeddings", "embedding"), "embeddings.position_embeddings.weight"),
        E(("embeddings", "token_type_embeddings", "embedding"), "embeddings.token_type_embeddings.weight"),
        *common.norm(("embeddings", "layernorm"), "embeddings.LayerNorm"),
    ]
    for i in range(c.num_layers):
        ours, hf = f"layer_{i}", f"encoder.layer.{i}."
        for name in ("query", "key", "value", "attn_out", "mlp_in", "mlp_out"):
            path = (ours, "attention", name) if name in ("query", "key", "value", "attn_out") else (ours, name)
            out += common.linear(path, hf + HF_MODULE_NAMES[name])
        out += common.norm((ours, "attn_norm"), hf + "attention.output.LayerNorm")
        out += common.norm((ours, "mlp_norm"), hf + "output.LayerNorm")
    if c.num_labels is not None:
        if c.roberta:
            out += common.linear(("classifier", "dense"), "classifier.dense")
            out += common.linear(("classifier", "out_proj"), "classifier.out_proj")
        else:
            out += common.linear(("pooler",), "pooler.dense")
            out += common.linear(("classifier",), "classifier")
    return out


def _heads(c: EncoderConfig) -> tuple[str, ...]:
    if c.num_labels is None:
        return ()
    return ("classifier",) if c.roberta else ("pooler", "classifier")


def params_from_hf(tensors: dict[str, np.ndarray], hf_config: dict, *, head_seed: int = 0, finish=None) -> dict:
    """HF state dict (any of BASE_ARCHITECTURES or *ForSequenceClassification) -> params.

    With a classification architecture, a head subtree (`classifier`, and BERT's `pooler`)
    of which the checkpoint holds no tensor is initialised as
    `build(hf_config).init(jax.random.key(head_seed))` would; everything else must match.
    Ignored checkpoint tensors: `IGNORED`, plus `pooler.*` when the model has no pooler.
    `finish` is applied to each leaf as it is made (`common.params_from_entries`).
    """
    c = EncoderConfig.from_hf(hf_config)
    module = Encoder(c)
    inputs = dummy_inputs(hf_config)
    heads = _heads(c)
    ignore = IGNORED + (() if "pooler" in heads else (POOLER,))
    prefix = "roberta." if c.roberta else "bert."
    return common.params_from_entries(
        common.strip_prefix(tensors, prefix),
        _entries(c),
        common.abstract_params(module, inputs),
        ignore=ignore,
        fresh={h: (lambda h=h: common.init_subtrees(module, inputs, [h], head_seed)[h]) for h in heads},
        finish=finish,
    )


def params_to_hf(params: dict, hf_config: dict) -> dict[str, np.ndarray]:
    """Params -> HF state dict loadable by the HF class of `hf_config`'s architecture."""
    c = EncoderConfig.from_hf(hf_config)
    tensors = common.params_to_entries(params, _entries(c))
    if c.num_labels is None:
        return tensors
    prefix = "roberta." if c.roberta else "bert."
    return {k if k.startswith("classifier") else prefix + k: v for k, v in tensors.items()}
