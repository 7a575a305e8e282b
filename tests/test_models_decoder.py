"""GPT-2 and LLaMA against tiny random HF PyTorch models saved as safetensors; KV-cache decoding."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import vera_jax
import vera_jax.models as models_pkg
from vera_jax.models import common, decoding, generate, gpt2, llama

PAD = 1  # HF fills finished beams with `pad or eos`, so a pad id of 0 would read as eos there
PROMPT = 6
NEW = 7

CONFIGS = {
    "gpt2": (gpt2, lambda: transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, initializer_range=0.3,
        bos_token_id=0, eos_token_id=2)),
    "llama": (llama, lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, initializer_range=0.3, rope_theta=500.0, bos_token_id=0, eos_token_id=2)),
    "llama_tied_llama3_bias": (llama, lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        vocab_size=100, initializer_range=0.3, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        max_position_embeddings=64, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        bos_token_id=0, eos_token_id=2)),
}
DECODING = ("gpt2", "llama")


class Case:
    """A saved HF model, its torch module and our module + params."""

    def __init__(self, name, tmp_path_factory):
        family, make_config = CONFIGS[name]
        torch.manual_seed(0)
        self.torch_model = transformers.AutoModelForCausalLM.from_config(make_config()).eval()
        self.dir = tmp_path_factory.mktemp(name)
        self.torch_model.save_pretrained(self.dir, safe_serialization=True)
        self.family = family
        self.hf_config = json.loads((self.dir / "config.json").read_text())
        self.tensors = load_file(str(self.dir / "model.safetensors"))
        self.model = family.build(self.hf_config)
        self.params = family.params_from_hf(self.tensors, self.hf_config)
        self.apply = jax.jit(self.model.apply)

    def logits(self, ids, mask, params=None):
        params = self.params if params is None else params
        return np.asarray(self.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))

    def torch_generate(self, ids, mask, **kwargs):
        with torch.no_grad():
            out = self.torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                            max_new_tokens=NEW, pad_token_id=PAD, return_dict_in_generate=True,
                                            output_scores=True, **kwargs)
        tokens = np.full((len(ids), NEW), PAD)
        tokens[:, :out.sequences.shape[1] - PROMPT] = out.sequences[:, PROMPT:].numpy()
        return tokens, out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = Case(name, tmp_path_factory)
        return built[name]

    return get


def batch(left_pad=(0, 2, 0), right_pad=(0, 0, 3)):
    """Rows with different left/right padding; pad slots hold arbitrary token ids."""
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 100, (len(left_pad), PROMPT))
    mask = np.ones_like(ids)
    for row, (left, right) in enumerate(zip(left_pad, right_pad)):
        mask[row, :left] = 0
        mask[row, PROMPT - right:] = 0
    return ids, mask


def left_padded():
    return batch(left_pad=(0, 2, 4), right_pad=(0, 0, 0))


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_torch_with_padding(cases, name):
    case = cases(name)
    ids, mask = batch()
    with torch.no_grad():
        want = case.torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                position_ids=torch.tensor(decoding.positions_from_mask(mask))).logits.numpy()
    got = case.logits(ids, mask)
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama_tied_llama3_bias"])
def test_remat_gives_same_logits(cases, name):
    case = cases(name)
    ids, mask = batch()
    remat = case.family.build(case.hf_config, remat=True)
    got = np.asarray(jax.jit(remat.apply)({"params": case.params}, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got, case.logits(ids, mask), atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_param_has_logical_axes(cases, name):
    case = cases(name)
    boxed = jax.eval_shape(lambda: case.model.init(jax.random.key(0), *case.family.dummy_inputs(case.hf_config)))
    leaves = jax.tree_util.tree_leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned) and len(leaf.names) == leaf.value.ndim
        assert all(n in ("vocab", "embed", "heads", "mlp", None) for n in leaf.names)


@pytest.mark.parametrize("name", DECODING)
def test_cached_logits_match_uncached_at_every_step(cases, name):
    case = cases(name)
    ids, mask = batch()
    steps = np.random.RandomState(1).randint(3, 100, (len(ids), 3))
    full_ids = np.concatenate([ids, steps], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(steps)], axis=1)
    want = case.logits(full_ids, full_mask)
    apply = case.apply
    cache = case.model.init_cache(len(ids), full_ids.shape[1])
    logits, cache = apply({"params": case.params}, jnp.asarray(ids), jnp.asarray(full_mask), cache=cache)
    got = [logits]
    for t in range(steps.shape[1]):
        logits, cache = apply({"params": case.params}, jnp.asarray(steps[:, t:t + 1]), jnp.asarray(full_mask),
                              cache=cache)
        got.append(logits)
    got = np.concatenate(got, axis=1)
    np.testing.assert_allclose(got[full_mask == 1], want[full_mask == 1], atol=1e-5)
    assert int(cache["index"]) == full_ids.shape[1]


def eos_hit_by(case, ids, mask, count=1):
    """Tokens greedy decoding emits mid-way (row 0, then row 1), so the EOS path is exercised."""
    tokens = generate.greedy(case.model, case.params, jnp.asarray(ids), jnp.asarray(mask), NEW, None, PAD)
    eos = (int(tokens[0, 3]), int(tokens[1, 4]))[:count]
    return eos[0] if count == 1 else eos


@pytest.mark.parametrize("name", DECODING)
def test_greedy_matches_hf_generate(cases, name):
    case = cases(name)
    ids, mask = left_padded()
    eos = eos_hit_by(case, ids, mask)
    got = np.asarray(generate.greedy(case.model, case.params, jnp.asarray(ids), jnp.asarray(mask), NEW, eos, PAD))
    want, _ = case.torch_generate(ids, mask, eos_token_id=eos)
    np.testing.assert_array_equal(got, want)
    assert (got == eos).any() and (got == PAD).any()


def test_greedy_right_padded_row_matches_left_padded_copy(cases):
    case = cases("gpt2")
    ids, mask = left_padded()
    ids[2] = np.roll(ids[1], -2)
    mask[2] = np.roll(mask[1], -2)
    got = np.asarray(generate.greedy(case.model, case.params, jnp.asarray(ids), jnp.asarray(mask), NEW, None, PAD))
    np.testing.assert_array_equal(got[2], got[1])


@pytest.mark.parametrize("name,early_stopping,ngram,eos_count", [
    ("gpt2", False, 0, 2), ("gpt2", True, 2, 1), ("llama", "never", 0, 1)])
def test_beam_search_matches_hf_generate(cases, name, early_stopping, ngram, eos_count):
    case = cases(name)
    ids, mask = left_padded()
    eos = eos_hit_by(case, ids, mask, eos_count)
    got, scores = generate.beam_search(case.model, case.params, jnp.asarray(ids), jnp.asarray(mask), NEW, 4, 0.9,
                                       eos, PAD, no_repeat_ngram_size=ngram, early_stopping=early_stopping,
                                       return_scores=True)
    want, out = case.torch_generate(ids, mask, eos_token_id=eos, num_beams=4, length_penalty=0.9,
                                    early_stopping=early_stopping, no_repeat_ngram_size=ngram or None)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_allclose(np.asarray(scores), out.sequences_scores.numpy(), atol=1e-4)


def test_beam_search_invariants(cases):
    """One beam with early stopping is greedy; the returned score is the length-penalised log-prob."""
    case = cases("llama")
    ids, mask = left_padded()
    eos = eos_hit_by(case, ids, mask)
    args = (case.model, case.params, jnp.asarray(ids), jnp.asarray(mask), NEW)
    one = generate.beam_search(*args, 1, 0.9, eos, PAD, early_stopping=True)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(generate.greedy(*args, eos, PAD)))

    tokens, scores = generate.beam_search(*args, 4, 0.7, eos, PAD, return_scores=True)
    tokens = np.asarray(tokens)
    logp = jax.nn.log_softmax(case.logits(np.concatenate([ids, tokens], 1),
                                          np.concatenate([mask, np.ones_like(tokens)], 1)), axis=-1)
    for row in range(len(ids)):
        length = NEW if eos not in tokens[row] else list(tokens[row]).index(eos) + 1
        total = sum(float(logp[row, PROMPT - 1 + t, tokens[row, t]]) for t in range(length))
        assert float(scores[row]) == pytest.approx(total / length ** 0.7, abs=1e-4)


def test_vera_factored_path_equals_merged_params_for_generation(cases):
    """Every projection is an interceptable Dense (the factored path sees GQA's narrower key/value),
    and generation runs on the plain tree `merge` returns."""
    case = cases("llama")
    adapted = vera_jax.apply_vera(case.params, vera_jax.VeraConfig(r=4, targets=("query", "value", "down")))
    adapted = adapted.replace(adapter=jax.tree.map(lambda x: x + 0.5, adapted.adapter))
    merged = vera_jax.merge(adapted)
    ids, mask = batch()
    factored = jax.jit(lambda a, x, m: vera_jax.apply_factored(case.model, a, x, m))(adapted, ids, mask)
    factored = np.asarray(factored)
    np.testing.assert_allclose(factored, case.logits(ids, mask, merged), atol=1e-5)
    assert not np.allclose(factored, case.logits(ids, mask), atol=1e-2)
    ids, mask = left_padded()
    tokens = generate.greedy(case.model, merged, jnp.asarray(ids), jnp.asarray(mask), NEW, None, PAD)
    assert tokens.shape == (len(ids), NEW)


@pytest.mark.parametrize("name", CONFIGS)
def test_params_to_hf_inverts_params_from_hf(cases, name):
    case = cases(name)
    back = case.family.params_to_hf(case.params, case.hf_config)
    assert sorted(back) == sorted(case.tensors)
    for key, value in case.tensors.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("name,victim", [("gpt2", "transformer.h.1.mlp.c_fc.weight"),
                                         ("llama", "model.layers.1.self_attn.k_proj.weight")])
def test_checkpoint_errors_name_the_tensor(cases, name, victim):
    case = cases(name)
    missing = {k: v for k, v in case.tensors.items() if k != victim}
    with pytest.raises(common.CheckpointError, match=f"missing tensors.*{victim}"):
        case.family.params_from_hf(missing, case.hf_config)
    with pytest.raises(common.CheckpointError, match="unexpected tensors.*extra.weight"):
        case.family.params_from_hf({**case.tensors, "extra.weight": np.zeros(3)}, case.hf_config)
    with pytest.raises(common.CheckpointError, match=f"misshapen tensors: {victim}"):
        case.family.params_from_hf({**case.tensors, victim: case.tensors[victim][:, :-1]}, case.hf_config)


def test_gpt2_misshapen_fused_c_attn_is_named(cases):
    case = cases("gpt2")
    victim = "transformer.h.0.attn.c_attn.weight"
    with pytest.raises(common.CheckpointError, match=f"{victim}.*divisible by 3"):
        case.family.params_from_hf({**case.tensors, victim: case.tensors[victim][:, :-1]}, case.hf_config)
    with pytest.raises(common.CheckpointError, match=f"misshapen tensors: {victim}"):
        case.family.params_from_hf({**case.tensors, victim: case.tensors[victim][:, :-3]}, case.hf_config)


def test_gpt2_imports_legacy_names_and_buffers(cases):
    """The original `gpt2` checkpoint has no `transformer.` prefix and stores attention-mask buffers."""
    case = cases("gpt2")
    legacy = {k.removeprefix("transformer."): v for k, v in case.tensors.items()}
    legacy["h.0.attn.bias"] = np.ones((1, 1, 64, 64), np.float32)
    legacy["h.0.attn.masked_bias"] = np.zeros((), np.float32)
    params = gpt2.params_from_hf(legacy, case.hf_config)
    jax.tree.map(np.testing.assert_array_equal, params, case.params)


@pytest.mark.parametrize("name", DECODING)
def test_from_pretrained_loads_the_saved_model(cases, name):
    case = cases(name)
    model, params, _ = models_pkg.from_pretrained(str(case.dir))
    assert model == case.model
    jax.tree.map(np.testing.assert_array_equal, params, case.params)


def test_rope_reads_legacy_config_fields():
    current = {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}}
    legacy = {"rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert llama.rope_frequencies(legacy, 8) == llama.rope_frequencies(current, 8)
    assert llama.rope_frequencies({}, 8) == pytest.approx([1.0, 0.1, 0.01, 0.001])
    with pytest.raises(ValueError, match="'yarn'"):
        llama.rope_frequencies({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, 8)
