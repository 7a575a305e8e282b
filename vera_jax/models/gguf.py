"""Read GGUF files (llama.cpp's format) of the `llama`, `qwen2`, `qwen3`, `gemma2` and `gemma3`
architectures into the LLaMA family module (`models/llama.py`, which builds all five).

A GGUF holds the config and tokenizer as metadata and each tensor in a block-quantized
(or float) type. Reading is split so a later quantized-in-memory path can reuse it:

    raw_tensors(reader, config)  -> QuantizedTensor (HF name, stored blocks, type, shape), as stored
    dequantize(tensor)           -> float32 array in HF layout (torch `nn.Linear` (out, in))
    read_tensors(path, config)   -> {HF name: float32 array}, what `llama.params_from_hf` takes

llama.cpp's converter permutes the rows of q/k projections (its rotary pairs adjacent
elements; HF rotates halves); `raw_tensors` undoes that on whole rows, which blocks never
span, so the raw blocks and their dequantized values both come out in HF order, as
transformers' GGUF loader does after dequantizing. Only the `llama` architecture is permuted.
llama.cpp stores Gemma's RMSNorm weights as (1 + w); `raw_tensors` gives back w, as transformers'
loader does. Dequantization is `gguf.quants.dequantize`, the maintained reference transformers uses too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import jax
import numpy as np

from vera_jax.extras import require

gguf = require("gguf", "gguf")

@dataclasses.dataclass(frozen=True)
class Arch:
    """How one GGUF architecture maps to an HF config and names."""

    model_type: str
    architecture: str
    activation: dict  # the HF activation field and value
    permuted_qk: bool = False  # llama.cpp reorders q/k rows for its rotary (LLaMA only)
    norm_plus_one: bool = False  # norms stored as 1 + w (Gemma)
    post_norms: bool = False  # ffn_norm is Gemma 2/3's pre_feedforward_layernorm; post_* norms exist


GEMMA_ACT = {"hidden_activation": "gelu_pytorch_tanh"}
ARCHS = {
    "llama": Arch("llama", "LlamaForCausalLM", {"hidden_act": "silu"}, permuted_qk=True),
    "qwen2": Arch("qwen2", "Qwen2ForCausalLM", {"hidden_act": "silu"}),
    "qwen3": Arch("qwen3", "Qwen3ForCausalLM", {"hidden_act": "silu"}),
    "gemma2": Arch("gemma2", "Gemma2ForCausalLM", GEMMA_ACT, norm_plus_one=True, post_norms=True),
    "gemma3": Arch("gemma3_text", "Gemma3ForCausalLM", GEMMA_ACT, norm_plus_one=True, post_norms=True),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHS)
Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# GGUF -> HF names; per-block suffixes live under `blk.{i}.` / `model.layers.{i}.`.
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
GEMMA_BLOCK_NAMES = {**BLOCK_NAMES, "ffn_norm": "pre_feedforward_layernorm",
                     "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
# GGUF metadata key (after "{arch}.") -> HF config field; LLaMA's head size is its rope dimension,
# the others' their key length.
CONFIG_FIELDS = {
    "context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "vocab_size": "vocab_size",
    "attention.sliding_window": "sliding_window",
    "attn_logit_softcapping": "attn_logit_softcapping", "final_logit_softcapping": "final_logit_softcapping",
}
HEAD_DIM_FIELD = {"llama": "rope.dimension_count"}  # others: attention.key_length
TOKEN_IDS = {"bos_token_id": "bos_token_id", "padding_token_id": "pad_token_id"}
# llama.cpp's end-of-generation ids: end of text, of a turn (Llama 3's <|eot_id|>), of a message (tool calls)
END_IDS = ("eos_token_id", "eot_token_id", "eom_token_id")


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """One tensor as stored: `data` is the raw block bytes (uint8, one row per output row) or
    the float array; `shape` is the logical shape in HF (numpy) order, rows first."""

    name: str
    data: np.ndarray
    quant_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]


def open_gguf(path: str) -> gguf.GGUFReader:
    """A memory-mapped reader for `path`; tensors are read only when touched."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except ValueError as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def architecture(reader: gguf.GGUFReader) -> str:
    """`general.architecture`, checked against what this module reads."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{reader.data.filename}: GGUF architecture {arch!r} (general.architecture) is not "
                         f"supported; supported: {list(SUPPORTED_ARCHITECTURES)}")
    return arch


def read_config(path_or_reader: str | gguf.GGUFReader) -> dict:
    """An HF-style config.json dict (the family of `general.architecture`) from the file's metadata.

    `tie_word_embeddings` is true when the file has no `output.weight`; attention/MLP biases
    are taken from the tensors present (Qwen2's q/k/v bias is its family's own); the vocab size
    falls back to the token list's length. Gemma 2's soft-capping defaults to Gemma2Config's
    (50, 30) when the file has none; Gemma 2/3's query scale follows llama.cpp (head_dim, or
    hidden / heads for the 27B models), as their HF configs have it (transformers' GGUF loader keeps
    its config default, 256, which equals head_dim for every smaller Gemma 2/3). `eos_token_id`
    is `tokenizer.ggml.eos_token_id`, or the list of it, `eot_token_id` and `eom_token_id` when the
    file sets more than one (llama.cpp ends generation on each; HF configs list them so, e.g. Llama 3's).
    """
    reader = open_gguf(path_or_reader) if isinstance(path_or_reader, str) else path_or_reader
    arch = architecture(reader)
    spec = ARCHS[arch]
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{reader.data.filename}: tensor rope_freqs.weight (per-frequency rope scaling, as "
                         "Llama 3.1 files carry) is not supported")
    config = {"model_type": spec.model_type, "architectures": [spec.architecture], **spec.activation}
    fields = {**CONFIG_FIELDS, HEAD_DIM_FIELD.get(arch, "attention.key_length"): "head_dim"}
    for key, hf_key in fields.items():
        value = _field(reader, f"{arch}.{key}")
        if value is not None:
            config[hf_key] = value
    if arch == "gemma2":
        config.setdefault("attn_logit_softcapping", 50.0)
        config.setdefault("final_logit_softcapping", 30.0)
    if arch in ("gemma2", "gemma3"):
        heads, layers = _field(reader, f"{arch}.attention.head_count"), _field(reader, f"{arch}.block_count")
        head_dim = config.get("head_dim") or _field(reader, f"{arch}.embedding_length") // heads
        wide = (arch, layers) in (("gemma2", 46), ("gemma3", 62))  # the 27B models (llama.cpp's rule)
        config["query_pre_attn_scalar"] = _field(reader, f"{arch}.embedding_length") // heads if wide else head_dim
    for key in ("block_count", "embedding_length", "attention.head_count", "feed_forward_length"):
        if f"{arch}.{key}" not in reader.fields:
            raise ValueError(f"{reader.data.filename}: metadata {arch}.{key} is missing")
    if "vocab_size" not in config:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(f"{reader.data.filename}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is set")
        config["vocab_size"] = len(tokens.data)
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _field(reader, f"{arch}.rope.scaling.factor")}
    elif scaling != "none":
        raise ValueError(f"{reader.data.filename}: {arch}.rope.scaling.type {scaling!r} is not supported "
                         "(none, linear)")
    config["tie_word_embeddings"] = "output.weight" not in names
    config["attention_bias"] = any(n.endswith(".attn_output.bias" if arch == "qwen2" else ".attn_q.bias")
                                   for n in names)
    config["mlp_bias"] = any(n.endswith(".ffn_up.bias") for n in names)
    for key, hf_key in TOKEN_IDS.items():
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            config[hf_key] = value
    ends = list(dict.fromkeys(int(v) for key in END_IDS if (v := _field(reader, f"tokenizer.ggml.{key}")) is not None))
    if ends:
        config["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    return config


def hf_name(name: str, arch: str = "llama") -> str:
    """GGUF tensor name -> HF name; a name outside the tables comes back unchanged (and is then
    reported as unexpected under its GGUF name)."""
    module, _, suffix = name.rpartition(".")
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{suffix}"
    parts = module.split(".")
    blocks = GEMMA_BLOCK_NAMES if ARCHS[arch].post_norms else BLOCK_NAMES
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in blocks:
        return f"model.layers.{parts[1]}.{blocks[parts[2]]}.{suffix}"
    return name


def unpermute_rotary(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head, rows (pairs interleaved) -> (halves).

    Works on any array whose first axis is the projection's output rows, so on raw blocks too.
    """
    half = rows.shape[0] // num_heads // 2
    return rows.reshape(num_heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def raw_tensors(reader: gguf.GGUFReader, config: dict) -> Iterator[QuantizedTensor]:
    """Every tensor, HF-named and in HF row order, still in its stored type (no dequantizing; a
    Gemma norm, stored as float, comes back as w instead of the stored 1 + w)."""
    spec = ARCHS[architecture(reader)]
    rotary = {}
    if spec.permuted_qk:
        rotary = {".self_attn.q_proj.": config["num_attention_heads"],
                  ".self_attn.k_proj.": config.get("num_key_value_heads") or config["num_attention_heads"]}
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(f"{reader.data.filename}: tensor {t.name} has quantization type {t.tensor_type.name}, "
                             f"which is not supported; supported: {[q.name for q in SUPPORTED_TYPES]}")
        name = hf_name(t.name, architecture(reader))
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        data = t.data
        if spec.norm_plus_one and t.name.endswith("norm.weight"):
            if t.tensor_type not in (Q.F32, Q.F16, Q.BF16):
                raise ValueError(f"{reader.data.filename}: norm {t.name} is stored as {t.tensor_type.name}; only "
                                 "float norms are supported")
            data = np.asarray(gguf.quants.dequantize(data, t.tensor_type), np.float32) - 1
            yield QuantizedTensor(name, data, Q.F32, shape)
            continue
        heads = next((n for part, n in rotary.items() if part in name), None)
        if heads is not None:
            if data.ndim != len(shape):  # a quantized 1-D tensor has no whole rows to move
                raise ValueError(f"{reader.data.filename}: tensor {t.name} is 1-D in type {t.tensor_type.name}; "
                                 "only float types are supported for q/k biases")
            data = unpermute_rotary(data, heads)
        yield QuantizedTensor(name, data, t.tensor_type, shape)


def dequantize(tensor: QuantizedTensor) -> np.ndarray:
    """float32 values of a stored tensor, in its logical shape."""
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.quant_type), np.float32).reshape(tensor.shape)


def read_tensors(path_or_reader: str | gguf.GGUFReader, config: dict | None = None) -> dict[str, np.ndarray]:
    """{HF name: float32 array} for every tensor in the file (config read from it unless given)."""
    reader = open_gguf(path_or_reader) if isinstance(path_or_reader, str) else path_or_reader
    config = read_config(reader) if config is None else config
    return {t.name: dequantize(t) for t in raw_tensors(reader, config)}


def load_tokenizer(path_or_reader: str | gguf.GGUFReader):
    """The HF fast tokenizer the file's `tokenizer.ggml.*` metadata describes, built by
    transformers' own GGUF converter; None when the file carries no vocabulary."""
    reader = open_gguf(path_or_reader) if isinstance(path_or_reader, str) else path_or_reader
    if "tokenizer.ggml.tokens" not in reader.fields:
        return None
    from transformers import AutoTokenizer

    path = os.path.abspath(reader.data.filename)
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


KEPT_4BIT = {Q.Q4_0: "q4_0", Q.Q4_1: "q4_1"}


def keep_4bit(params: dict, path_or_reader: str | gguf.GGUFReader, config: dict | None = None) -> dict:
    """`params` (this file's LLaMA, as `read_tensors` + `llama.params_from_hf` build it) with every
    linear weight the file stores as Q4_0 / Q4_1 replaced by its stored blocks
    (`vera_jax.quant.GGUFQ4Kernel`), so the frozen base stays 4-bit in device memory and is
    dequantized per layer inside jit. Embeddings and lm_head stay float (the model looks rows up /
    trains next to them); other stored types stay as loaded."""
    from vera_jax import quant
    from vera_jax.models import llama
    from vera_jax.tree import get_path, set_path

    reader = open_gguf(path_or_reader) if isinstance(path_or_reader, str) else path_or_reader
    config = read_config(reader) if config is None else config
    linear = {e.hf: e.path for e in llama._entries(config) if e.kind == "linear" and e.path[0] != "lm_head"}
    out = jax.tree.map(lambda x: x, params, is_leaf=quant.is_quantized)
    for t in raw_tensors(reader, config):
        if t.name in linear and t.quant_type in KEPT_4BIT:
            kernel = quant.GGUFQ4Kernel.from_blocks(t.data, KEPT_4BIT[t.quant_type], t.shape)
            want = tuple(get_path(params, linear[t.name]).shape)
            if kernel.shape != want:
                raise ValueError(f"{reader.data.filename}: tensor {t.name} is {t.shape} (out, in); the model's "
                                 f"{'/'.join(linear[t.name])} expects {want} (in, out)")
            set_path(out, linear[t.name], kernel)
    return out
