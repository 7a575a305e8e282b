"""Generation over a step function: adapter paths agree, sampling follows HF's warpers, compiles once."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as hf

import vera_jax
from vera_jax.models import ModelDecoder, generate, gpt2, llama, sample_tokens, warp_logits

PAD = 1
NEW = 7

FAMILIES = {
    "gpt2": (gpt2, transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, initializer_range=0.3),
        ("query", "value", "mlp_out")),
    "llama": (llama, transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, initializer_range=0.3, rope_theta=500.0), ("query", "value", "down")),
    # a sliding layer (window 3 < the 9 slots decoded) and a global one, q/k norms, post norms, GeGLU
    "gemma3": (llama, transformers.Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=100, initializer_range=0.3, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"]), ("query", "value", "down")),
}


@pytest.fixture(scope="module")
def models():
    """name -> (model, params, adapter targets): tiny random models built from configs."""
    built = {}

    def get(name):
        if name not in built:
            family, config, targets = FAMILIES[name]
            model = family.build(config.to_dict())
            params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
            if name == "gemma3":  # Gemma norms start at w = 0; random ones let the residual branches matter
                params = jax.tree_util.tree_map_with_path(
                    lambda p, x: 2 * jax.random.normal(jax.random.key(len(p)), x.shape) if p[-1].key == "scale"
                    else x, params)
            built[name] = (model, params, targets)
        return built[name]

    return get


def adapter(params, method, targets):
    """A VeRA or LoRA adapter with random nonzero vectors, so it changes the model's outputs."""
    if method == "vera":
        adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=8, targets=targets))
    else:
        adapted = vera_jax.apply_lora(params, vera_jax.LoraConfig(r=4, alpha=8, targets=targets))
    leaves, treedef = jax.tree.flatten(adapted.adapter)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    scale = 1.0 if method == "vera" else 0.3
    leaves = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return adapted.replace(adapter=jax.tree.unflatten(treedef, leaves))


def prompts(batch=3, length=6):
    """Rows with 0, 2, 4 ... left pads (pad slots hold arbitrary ids)."""
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 100, (batch, length))
    mask = np.ones_like(ids)
    for row in range(batch):
        mask[row, :2 * row] = 0
    return ids, mask


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", ["vera", "lora"])
def test_merged_factored_and_auto_paths_give_the_same_greedy_tokens(models, name, method):
    """2 rows * (4 prompt + 5 new) = 18 tokens: auto merges the narrower layers and factors the MLP one."""
    model, params, targets = models(name)
    adapted = adapter(params, method, targets)
    ids, mask = prompts(batch=2, length=4)
    prepared = ModelDecoder(model, "auto").prepare(adapted, 18)
    assert [s.path[-1] for s in prepared.layers] == [targets[-1]] * 2
    np.testing.assert_array_equal(prepared.base["layer_0"][targets[-1]]["kernel"],
                                  params["layer_0"][targets[-1]]["kernel"])
    np.testing.assert_allclose(prepared.base["layer_0"]["attention"]["query"]["kernel"],
                               vera_jax.merge(adapted)["layer_0"]["attention"]["query"]["kernel"])

    merged = np.asarray(generate.greedy(model, adapted, ids, mask, 5, None, PAD, path="merged"))
    assert not np.array_equal(merged, generate.greedy(model, params, ids, mask, 5, None, PAD))
    for path in ("factored", "auto"):
        got = generate.greedy(model, adapted, ids, mask, 5, None, PAD, path=path)
        np.testing.assert_array_equal(np.asarray(got), merged, err_msg=path)


def test_merged_and_factored_paths_give_the_same_sampled_and_beam_tokens(models):
    model, params, targets = models("llama")
    adapted = adapter(params, "vera", targets)
    ids, mask = prompts()
    settings = dict(seeds=np.array([3, 4, 5]), temperature=0.8, top_k=20, top_p=0.9)
    sampled = [np.asarray(generate.sample(model, adapted, ids, mask, NEW, None, PAD, path=path, **settings))
               for path in ("merged", "factored")]
    beams = [np.asarray(generate.beam_search(model, adapted, ids, mask, NEW, 3, 1.0, None, PAD, path=path))
             for path in ("merged", "factored")]
    np.testing.assert_array_equal(sampled[1], sampled[0])
    np.testing.assert_array_equal(beams[1], beams[0])


def hf_warp(logits, temperature, top_k, top_p):
    """HF's warpers, added under the conditions and in the order `_get_logits_processor` uses."""
    processors = hf.LogitsProcessorList()
    if temperature != 1.0:
        processors.append(hf.TemperatureLogitsWarper(float(temperature)))
    if top_k:
        processors.append(hf.TopKLogitsWarper(int(top_k)))
    if top_p < 1.0:
        processors.append(hf.TopPLogitsWarper(float(top_p)))
    return processors(None, torch.tensor(np.asarray(logits))).numpy()


SETTINGS = [(0.7, 0, 1.0), (1.0, 10, 1.0), (1.0, 0, 0.8), (0.7, 20, 0.9), (1.5, 5, 0.5), (2.0, 500, 0.3),
            (1.0, 0, 0.0)]


def random_logits(rows, vocab=50, seed=0):
    return (3.0 * np.random.RandomState(seed).randn(rows, vocab)).astype(np.float32)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_warp_logits_gives_hf_processors_distribution(temperature, top_k, top_p):
    logits = random_logits(6)
    got = np.asarray(warp_logits(jnp.asarray(logits), temperature, top_k, top_p))
    want = hf_warp(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(jax.nn.softmax(got), torch.softmax(torch.tensor(want), -1).numpy(), atol=1e-6)


def test_warp_logits_takes_one_setting_per_row():
    logits = random_logits(len(SETTINGS))
    temperature, top_k, top_p = (np.array(column) for column in zip(*SETTINGS))
    got = np.asarray(warp_logits(jnp.asarray(logits), temperature, top_k, top_p))
    for row, setting in enumerate(SETTINGS):
        np.testing.assert_array_equal(np.isinf(got[row]), np.isinf(hf_warp(logits[row:row + 1], *setting)[0]))


def test_sampled_tokens_follow_hf_distribution():
    """4,000 rows with the same logits and distinct seeds: frequencies within 0.03 of HF's probabilities."""
    n, setting = 4000, (0.7, 20, 0.9)
    logits = np.repeat(random_logits(1, vocab=20, seed=3), n, axis=0)
    want = torch.softmax(torch.tensor(hf_warp(logits[:1], *setting)), -1).numpy()[0]
    tokens = np.asarray(jax.jit(sample_tokens)(jnp.asarray(logits), jnp.arange(n, dtype=jnp.uint32), 0, *setting))
    freq = np.bincount(tokens, minlength=logits.shape[1]) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))
    np.testing.assert_allclose(freq, want, atol=0.03)


def test_sampling_is_reproducible_and_each_row_depends_only_on_its_seed(models):
    model, params, _ = models("gpt2")
    ids, mask = prompts()
    settings = dict(temperature=1.5, top_k=0, top_p=1.0)
    first = np.asarray(generate.sample(model, params, ids, mask, NEW, None, PAD, seeds=np.array([5, 6, 7]), **settings))
    again = np.asarray(generate.sample(model, params, ids, mask, NEW, None, PAD, seeds=np.array([5, 6, 7]), **settings))
    np.testing.assert_array_equal(again, first)
    order = [2, 0]
    regrouped = generate.sample(model, params, ids[order], mask[order], NEW, None, PAD, seeds=np.array([7, 5]),
                                **settings)
    np.testing.assert_array_equal(np.asarray(regrouped), first[order])
    other = generate.sample(model, params, ids, mask, NEW, None, PAD, seeds=np.array([8, 9, 10]), **settings)
    assert not np.array_equal(np.asarray(other), first)
    top1 = generate.sample(model, params, ids, mask, NEW, None, PAD, seeds=np.array([8, 9, 10]), top_k=1)
    np.testing.assert_array_equal(np.asarray(top1), generate.greedy(model, params, ids, mask, NEW, None, PAD))


def test_generation_compiles_once_per_shape(models):
    """New params values, prompts, seeds, EOS/pad ids and sampling settings reuse the compiled loop."""
    model, params, targets = models("gpt2")
    ids, mask = prompts()
    calls = [dict(eos=2, pad=PAD, seeds=[1, 2, 3], temperature=0.7, top_k=5, top_p=0.9, shift=0.0),
             dict(eos=5, pad=0, seeds=[4, 5, 6], temperature=1.3, top_k=0, top_p=1.0, shift=0.5)]
    sizes = []
    for call in calls:
        adapted = adapter(params, "vera", targets)
        adapted = adapted.replace(adapter=jax.tree.map(lambda x, shift=call["shift"]: x + shift, adapted.adapter))
        generate.greedy(model, adapted, (ids + call["eos"]) % 100, mask, NEW, call["eos"], call["pad"],
                        path="factored")
        generate.sample(model, adapted, ids, mask, NEW, call["eos"], call["pad"], path="factored",
                        seeds=np.array(call["seeds"]), temperature=call["temperature"], top_k=call["top_k"],
                        top_p=call["top_p"])
        sizes.append(generate._decode._cache_size())
    assert sizes[1] == sizes[0]


@dataclasses.dataclass(frozen=True)
class BoostDecoder:
    """A Decoder with a per-row input: row i's logit for token `rows["boost"][i]` gains 100."""

    inner: ModelDecoder

    def prepare(self, params, tokens):
        return self.inner.prepare(params, tokens)

    def init_cache(self, batch_size, max_length):
        return self.inner.init_cache(batch_size, max_length)

    def apply(self, prepared, input_ids, attention_mask, cache, rows):
        logits, cache = self.inner.apply(prepared, input_ids, attention_mask, cache, None)
        boost = jax.nn.one_hot(rows["boost"], logits.shape[-1])[:, None, :]
        return logits + 100.0 * boost, cache


def test_a_custom_decoder_gets_its_per_row_inputs_in_every_loop(models):
    model, params, targets = models("llama")
    decoder = BoostDecoder(ModelDecoder(model, "factored"))
    adapted = adapter(params, "lora", targets)
    ids, mask = prompts()
    rows = {"boost": jnp.array([11, 12, 13])}
    want = np.repeat(np.array([[11], [12], [13]]), NEW, axis=1)
    np.testing.assert_array_equal(generate.greedy(decoder, adapted, ids, mask, NEW, None, PAD, rows=rows), want)
    beams = generate.beam_search(decoder, adapted, ids, mask, NEW, 2, 1.0, None, PAD, rows=rows)
    np.testing.assert_array_equal(beams, want)


def test_errors_name_the_argument(models):
    model, params, targets = models("gpt2")
    adapted = adapter(params, "vera", targets)
    ids, mask = prompts()
    args = (ids, mask, NEW, None, PAD)
    with pytest.raises(ValueError, match="path: 'fused'"):
        generate.greedy(model, adapted, *args, path="fused")
    with pytest.raises(TypeError, match="params: path='merged' needs an Adapted"):
        generate.greedy(model, params, *args, path="merged")
    with pytest.raises(ValueError, match="path: only for a linen model"):
        generate.greedy(ModelDecoder(model), params, *args, path="merged")
    with pytest.raises(ValueError, match="rows: ModelDecoder takes no per-row inputs"):
        generate.greedy(model, params, *args, rows={"boost": jnp.zeros(3, jnp.int32)})
    with pytest.raises(ValueError, match=r"seeds: expected \(3,\)"):
        generate.sample(model, params, *args, seeds=np.arange(2))
    with pytest.raises(ValueError, match="temperature: 0.0 is not allowed; it must be > 0"):
        generate.sample(model, params, *args, seeds=np.arange(3), temperature=0.0)
    with pytest.raises(ValueError, match="top_p: 1.5"):
        generate.sample(model, params, *args, seeds=np.arange(3), top_p=1.5)
    with pytest.raises(ValueError, match=r"top_k: shape \(2,\)"):
        generate.sample(model, params, *args, seeds=np.arange(3), top_k=np.array([1, 2]))
    with pytest.raises(ValueError, match="max_new_tokens: 0"):
        generate.greedy(model, params, ids, mask, 0, None, PAD)
