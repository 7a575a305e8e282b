"""GGUF import of the gemma3, gemma2, qwen2 and qwen3 architectures: tiny files written with gguf's own
writer (llama.cpp's names, Gemma norms stored as 1 + w), checked against transformers' GGUF loader."""

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vera_jax import quant
from vera_jax.models import from_pretrained, llama
from vera_jax.models import gguf as gguf_io

Q = gguf.GGMLQuantizationType
WIDTH, INNER, HEADS, KV_HEADS, VOCAB = 64, 96, 4, 2, 40
# head_dim != 64 / 4 (but for qwen2), and the real models' values: transformers' GGUF loader keeps its config
# defaults where we read the file (Qwen3's head_dim 128 instead of attention.key_length; Gemma's
# query_pre_attn_scalar 256 where llama.cpp and we use head_dim); they agree on every released model but the 27Bs
HEAD_DIM = {"gemma3": 256, "gemma2": 256, "qwen2": WIDTH // HEADS, "qwen3": 128}
LAYERS = {"gemma3": 6, "gemma2": 2, "qwen2": 2, "qwen3": 2}  # gemma3: 5 sliding layers, then a global one


def write(path, arch, qtype=Q.Q8_0, seed=0, softcaps=None):
    rng = np.random.RandomState(seed)
    head_dim = HEAD_DIM[arch]
    layers = LAYERS[arch]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(WIDTH)
    writer.add_feed_forward_length(INNER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(1000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    if arch != "qwen2":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.startswith("gemma"):
        writer.add_sliding_window(3)
    if softcaps:  # transformers' GGUF loader ignores these (keeps Gemma2Config's 50 / 30, what real files hold)
        writer.add_attn_logit_softcapping(softcaps[0])
        writer.add_final_logit_softcapping(softcaps[1])

    def matrix(name, rows, cols):
        w = (rng.randn(rows, cols) * 0.3).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(w, qtype) if qtype != Q.F32 else w, raw_dtype=qtype)

    def norm(name, size=WIDTH):  # llama.cpp stores Gemma's (1 + w)
        writer.add_tensor(name, (1 + 0.3 * rng.randn(size)).astype(np.float32))

    matrix("token_embd.weight", VOCAB, WIDTH)
    norm("output_norm.weight")
    gemma = arch.startswith("gemma")
    for i in range(layers):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight")
        norm(b + "ffn_norm.weight")
        if gemma:
            norm(b + "post_attention_norm.weight")
            norm(b + "post_ffw_norm.weight")
        if arch in ("gemma3", "qwen3"):
            norm(b + "attn_q_norm.weight", head_dim)
            norm(b + "attn_k_norm.weight", head_dim)
        for name, rows, cols in [("attn_q", HEADS * head_dim, WIDTH), ("attn_k", KV_HEADS * head_dim, WIDTH),
                                 ("attn_v", KV_HEADS * head_dim, WIDTH), ("attn_output", WIDTH, HEADS * head_dim),
                                 ("ffn_gate", INNER, WIDTH), ("ffn_up", INNER, WIDTH), ("ffn_down", WIDTH, INNER)]:
            matrix(f"{b}{name}.weight", rows, cols)
        if arch == "qwen2":
            for name, rows in [("attn_q", HEADS * head_dim), ("attn_k", KV_HEADS * head_dim),
                               ("attn_v", KV_HEADS * head_dim)]:
                writer.add_tensor(f"{b}{name}.bias", (0.3 * rng.randn(rows)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def ours(path):
    reader = gguf_io.open_gguf(path)
    config = gguf_io.read_config(reader)
    model = llama.build(config)
    return model, llama.params_from_hf(gguf_io.read_tensors(reader, config), config), config


@pytest.mark.parametrize("arch", list(LAYERS))
def test_logits_match_transformers_gguf_loader(tmp_path, arch):
    path = write(tmp_path / f"tiny-{arch}.gguf", arch)
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 9))  # 9 slots: past the window of 3
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch_model(torch.tensor(ids)).logits.numpy()
    model, params, config = ours(path)
    assert type(torch_model).__name__ == config["architectures"][0]
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_gemma_configs_come_from_the_metadata(tmp_path):
    gemma3 = gguf_io.read_config(write(tmp_path / "g3.gguf", "gemma3"))
    assert gemma3["model_type"] == "gemma3_text" and gemma3["head_dim"] == 256
    assert gemma3["sliding_window"] == 3 and gemma3["query_pre_attn_scalar"] == 256
    assert gemma3["hidden_activation"] == "gelu_pytorch_tanh" and gemma3["tie_word_embeddings"]
    model = llama.build(gemma3)
    assert model.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    gemma2 = gguf_io.read_config(write(tmp_path / "g2.gguf", "gemma2", softcaps=(5.0, 4.0)))
    assert (gemma2["attn_logit_softcapping"], gemma2["final_logit_softcapping"]) == (5.0, 4.0)
    gemma2 = gguf_io.read_config(write(tmp_path / "g2-default.gguf", "gemma2"))
    assert (gemma2["attn_logit_softcapping"], gemma2["final_logit_softcapping"]) == (50.0, 30.0)


def test_gemma_norms_come_back_as_w(tmp_path):
    """llama.cpp stores a Gemma norm as 1 + w; the raw view already gives w (the HF weight)."""
    path = write(tmp_path / "g3.gguf", "gemma3", qtype=Q.F32)
    reader = gguf_io.open_gguf(path)
    raw = {t.name: t for t in gguf_io.raw_tensors(reader, gguf_io.read_config(reader))}
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_q_norm.weight")
    np.testing.assert_allclose(raw["model.layers.0.self_attn.q_norm.weight"].data, stored.data - 1)
    assert "model.layers.0.pre_feedforward_layernorm.weight" in raw  # ffn_norm is Gemma's pre-MLP norm


def test_gemma3_q4_0_blocks_stay_4bit(tmp_path):
    """keep_4bit (model.quantize='gguf') works on the other architectures' linear layers too."""
    path = write(tmp_path / "g3.gguf", "gemma3", qtype=Q.Q4_0)
    model, params, tokenizer = from_pretrained(path)
    assert tokenizer is None
    kept = gguf_io.keep_4bit(params, path)
    assert isinstance(kept["layer_0"]["attention"]["query"]["kernel"], quant.GGUFQ4Kernel)
    ids = jnp.asarray(np.random.RandomState(2).randint(0, VOCAB, (1, 7)))
    with quant.dequantized():
        got = jax.jit(lambda p: model.apply({"params": p}, ids))(kept)
    np.testing.assert_allclose(np.asarray(got), np.asarray(model.apply({"params": params}, ids)), atol=1e-5)
