"""Merged checkpoints (base + adapter folded in) load in transformers and give our logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

import vera_jax  # noqa: E402
from vera_jax.interop import export_merged  # noqa: E402
from vera_jax.models import from_pretrained  # noqa: E402

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
IDS = np.random.default_rng(0).integers(3, 64, (2, 7))


def _checkpoint(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "roberta":
        model = transformers.RobertaForSequenceClassification(
            transformers.RobertaConfig(vocab_size=64, max_position_embeddings=40, num_labels=3, **TEXT))
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **TEXT))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                     n_positions=40))
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _trained(adapted):
    leaves, treedef = jax.tree.flatten(adapted.adapter)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    adapter = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    base = jax.tree.map(lambda x: x, adapted.base)
    for path in adapted.extra:
        leaf = vera_jax.adapters.core.get_path(base, path)
        vera_jax.adapters.core.set_path(base, path, leaf + 0.1)
    return adapted.replace(adapter=adapter, base=base)


@pytest.mark.parametrize("kind,method,targets", [
    ("roberta", "vera", ("query", "value")),
    ("llama", "lora", ("query", "value", "gate", "down")),
    ("gpt2", "vera", ("query", "value", "mlp_out")),   # query/value are re-fused into c_attn
])
def test_merged_checkpoint_loads_in_transformers_with_our_logits(tmp_path, kind, method, targets):
    base = _checkpoint(tmp_path, kind)
    model, params, _ = from_pretrained(str(base))
    extra = ("classifier",) if kind == "roberta" else ()
    if method == "vera":
        adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=8, targets=targets, trainable_extra=extra))
    else:
        adapted = vera_jax.apply_lora(params, vera_jax.LoraConfig(r=4, alpha=8, targets=targets))
    adapted = _trained(adapted)
    ours = np.asarray(jax.jit(lambda a, x: vera_jax.apply_factored(model, a, x))(adapted, jnp.asarray(IDS)))

    out = export_merged(tmp_path / "merged", adapted, base)
    hf = transformers.AutoConfig.from_pretrained(out).architectures[0]
    with torch.no_grad():
        theirs = getattr(transformers, hf).from_pretrained(out).eval()(torch.from_numpy(IDS)).logits.numpy()
        unadapted = getattr(transformers, hf).from_pretrained(base).eval()(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not np.allclose(unadapted, ours, atol=1e-3)
    assert set(load_file(out / "model.safetensors")) == set(load_file(base / "model.safetensors"))


def test_merged_checkpoint_casts_to_dtype(tmp_path):
    base = _checkpoint(tmp_path, "llama")
    _, params, _ = from_pretrained(str(base))
    out = export_merged(tmp_path / "merged", params, base, dtype="bfloat16")
    assert {str(v.dtype) for v in load_file(out / "model.safetensors").values()} == {"bfloat16"}
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.dtype == torch.bfloat16
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
