"""The zoo with `scan_layers=True`: every family's blocks under one nn.scan give the unrolled model's
outputs, gradients and greedy tokens (KV cache stacked), load the same HF checkpoints as transformers'
PyTorch models and export them back per layer; the runner config and the server accept it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import vera_jax
from vera_jax.errors import ConfigError
from vera_jax.interop import export_merged
from vera_jax.models import common, decoding, from_pretrained, generate, gpt2, hub, llama, loader
from vera_jax.tasks import runner

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37)
# family -> (HF config, transformers class); 3 layers so a layer axis cannot pass for another axis
HF = {
    "roberta": (lambda: transformers.RobertaConfig(vocab_size=99, max_position_embeddings=40, num_labels=3, **TINY),
                transformers.RobertaForSequenceClassification),
    "bert": (lambda: transformers.BertConfig(vocab_size=99, max_position_embeddings=40, num_labels=2, **TINY),
             transformers.BertForSequenceClassification),
    "vit": (lambda: transformers.ViTConfig(image_size=16, patch_size=4, num_labels=5, **TINY),
            transformers.ViTForImageClassification),
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100, n_positions=64,
                                             initializer_range=0.3, bos_token_id=0, eos_token_id=2),
             transformers.GPT2LMHeadModel),
    "llama": (lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, initializer_range=0.3, rope_theta=500.0, bos_token_id=0, eos_token_id=2,
        max_position_embeddings=64), transformers.LlamaForCausalLM),
    # every layer sliding (window 4 < the 11 slots the generation test fills), q/k/v as LLaMA's
    "mistral": (lambda: transformers.MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, initializer_range=0.3, rope_theta=500.0, bos_token_id=0, eos_token_id=2,
        max_position_embeddings=64, sliding_window=4), transformers.MistralForCausalLM),
}
DECODERS = ("gpt2", "llama", "mistral")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (checkpoint dir, torch model), saved once per module."""
    out = {}

    def get(name):
        if name not in out:
            make_config, cls = HF[name]
            torch.manual_seed(0)
            model = cls(make_config()).eval()
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path, safe_serialization=True)
            out[name] = (str(path), model)
        return out[name]

    return get


def inputs(name, batch=2, length=7):
    """Model inputs (positional) and the torch call's keyword inputs; text rows right-padded."""
    rng = np.random.RandomState(0)
    if name == "vit":
        images = rng.randn(batch, 16, 16, 3).astype(np.float32)
        return (jnp.asarray(images),), {"pixel_values": torch.tensor(images.transpose(0, 3, 1, 2))}
    ids = rng.randint(3, 99, (batch, length))
    mask = np.ones_like(ids)
    mask[1, length - 2:] = 0
    if name in ("roberta", "bert"):
        ids[1, length - 2:] = 1 if name == "roberta" else 0
    torch_kw = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if name in DECODERS:
        torch_kw["position_ids"] = torch.tensor(np.asarray(decoding.positions_from_mask(mask)))
    return (jnp.asarray(ids), jnp.asarray(mask)), torch_kw


def valid(name, array):
    """The positions compared: real tokens of the right-padded row for token-level outputs."""
    if name not in DECODERS:
        return array
    return np.concatenate([array[0], array[1, :-2]])


@pytest.mark.parametrize("name", ["roberta", "vit", "gpt2", "llama"])  # BERT is RoBERTa's module
def test_scanned_equals_unrolled_zoo_model(name):
    """Same seed, same weights: the scanned model's outputs and gradients are the unrolled one's (1e-5)."""
    hf_config = HF[name][0]().to_dict()
    unrolled = loader.random_model(hf_config, seed=3)
    scanned = loader.LoadedModel(unrolled.module.clone(scan_layers=True), common.stack_layers(unrolled.params),
                                 None, hf_config, "", None)
    assert "layer" in scanned.params and not any(k.startswith("layer_") for k in scanned.params)
    jax.tree.map(np.testing.assert_array_equal, common.unstack_layers(scanned.params), unrolled.params)
    args, _ = inputs(name)

    def run(model):
        def loss(p):
            out = model.module.apply({"params": p}, *args)
            weights = jax.random.normal(jax.random.key(0), out.shape)  # every output matters to the gradient
            return jnp.sum(out * weights), out

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(model.params)

    ((_, want), grads), ((_, got), scanned_grads) = run(unrolled), run(scanned)
    np.testing.assert_allclose(got, want, atol=1e-5)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale),
                 common.unstack_layers(scanned_grads), grads)


@pytest.mark.parametrize("name", HF)
def test_scanned_layers_carry_the_layers_axis_name(name):
    """random_model(scan_layers=True) holds the unrolled params stacked; every stacked leaf's
    partitioning names start with "layers" (what the adapters read), then the unrolled leaf's names."""
    hf_config = HF[name][0]().to_dict()
    scanned = loader.random_model(hf_config, abstract=True, scan_layers=True)
    unrolled = loader.random_model(hf_config, abstract=True)
    assert scanned.module.scan_layers and not unrolled.module.scan_layers
    stacked = jax.eval_shape(common.stack_layers, unrolled.params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), scanned.params) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                                        stacked)
    flat = jax.tree_util.tree_flatten_with_path(scanned.param_axes["layer"],
                                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    assert flat
    for path, spec in flat:
        twin = unrolled.param_axes["layer_0"]
        for key in path:
            twin = twin[key.key]
        assert tuple(spec) == ("layers", *twin), path


@pytest.mark.parametrize("name", HF)
def test_scanned_checkpoint_matches_transformers_and_exports_back(saved, name, tmp_path):
    path, torch_model = saved(name)
    model, params, _ = from_pretrained(path, scan_layers=True)
    assert model.scan_layers and jax.tree.leaves(params["layer"])[0].shape[0] == 3
    args, torch_kw = inputs(name)
    with torch.no_grad():
        want = torch_model(**torch_kw).logits.numpy()
    got = np.asarray(jax.jit(model.apply)({"params": params}, *args))
    np.testing.assert_allclose(valid(name, got), valid(name, want), atol=1e-4, rtol=1e-4)
    # back to HF layout: the same tensors (GPT-2's c_attn fused again), and transformers reads the export
    hf_config = json.loads(open(f"{path}/config.json").read())
    stored = load_file(f"{path}/model.safetensors")
    written = hub.family(hf_config["model_type"]).params_to_hf(jax.tree.map(np.asarray, params), hf_config)
    prefix = {"bert": "bert.", "roberta": "roberta.", "vit": "vit."}.get(name, "")
    for key, value in written.items():
        np.testing.assert_array_equal(value, stored.get(key, stored.get(key.removeprefix(prefix))), err_msg=key)
    exported = export_merged(tmp_path / "out", params, hf_config)
    reloaded = type(torch_model).from_pretrained(exported).eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(**torch_kw).logits.numpy(), want, atol=1e-6)


@pytest.mark.parametrize("name", DECODERS)
def test_scanned_kv_cache_greedy_equals_unrolled(saved, name):
    path, torch_model = saved(name)
    unrolled, params, _ = from_pretrained(path)
    scanned, stacked, _ = from_pretrained(path, scan_layers=True)
    cache = scanned.init_cache(2, 11)
    assert set(cache) == {"index", "layer"} and cache["layer"]["key"].shape[:3] == (2, 11, 3)
    ids = np.random.RandomState(1).randint(3, 99, (2, 5))
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    runs = [np.asarray(generate.greedy(m, p, jnp.asarray(ids), jnp.asarray(mask), 6, None, 1))
            for m, p in ((unrolled, params), (scanned, stacked))]
    np.testing.assert_array_equal(runs[1], runs[0])
    beams = [np.asarray(generate.beam_search(m, p, jnp.asarray(ids), jnp.asarray(mask), 4, 3, 1.0, None, 1))
             for m, p in ((unrolled, params), (scanned, stacked))]
    np.testing.assert_array_equal(beams[1], beams[0])
    with torch.no_grad():
        hf = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                  max_new_tokens=6, pad_token_id=1, eos_token_id=None)
    np.testing.assert_array_equal(runs[1], hf[:, ids.shape[1]:].numpy())


def test_scanned_cache_with_a_per_row_index_equals_the_unrolled_cache(saved):
    """The serving engine's cache (one index per row) on the stacked cache: same logits as unrolled."""
    path, _ = saved("llama")
    models = [from_pretrained(path, scan_layers=scan)[:2] for scan in (False, True)]
    ids = jnp.asarray(np.random.RandomState(2).randint(3, 99, (2, 1)))
    mask = jnp.ones((2, 8), jnp.int32)
    outs = []
    for model, params in models:
        cache = {**model.init_cache(2, 8), "index": jnp.asarray([3, 5], jnp.int32)}
        logits, cache = model.apply({"params": params}, ids, mask, cache=cache)
        outs.append(logits)
        assert cache["index"].tolist() == [4, 6]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_scanned_remat_and_dropout_run_per_layer():
    """nn.remat inside the scan gives the same gradients; dropout runs inside the scan, from the
    call's key."""
    hf_config = {**HF["roberta"][0]().to_dict(), "hidden_dropout_prob": 0.5}
    scanned = loader.random_model(hf_config, scan_layers=True)
    module, params = scanned.module, scanned.params
    args, _ = inputs("roberta")
    weights = jax.random.normal(jax.random.key(0), (2, 7, 32))
    grads = [jax.jit(jax.grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, *args) * weights)))(params)
             for m in (module, module.clone(remat=True))]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *grads)

    def dropped(seed):
        return np.asarray(module.apply({"params": params}, *args, deterministic=False,
                                       rngs={"dropout": jax.random.key(seed)}))

    np.testing.assert_array_equal(dropped(0), dropped(0))
    assert not np.allclose(dropped(0), dropped(1))
    assert not np.allclose(dropped(0), module.apply({"params": params}, *args))


def test_refusals_name_the_field():
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True .* scan_layers"):
        gpt2.build({**HF["gpt2"][0]().to_dict(), "scale_attn_by_inverse_layer_idx": True}, scan_layers=True)
    with pytest.raises(ConfigError, match="model.scan_layers: True with model.quantize='nf4'"):
        loader.ModelSpec("x", quantize="nf4", scan_layers=True)
    gemma3 = transformers.Gemma3TextConfig(  # interleaved sliding and global layers cannot share one scan body
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=100, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    model = llama.build(gemma3.to_dict(), scan_layers=True)
    with pytest.raises(ValueError, match="scan_layers: every layer must be of one kind"):
        model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="expected top-level layer_0 ... layer_N"):
        common.stack_layers({"layer_0": {"a": np.zeros(2)}, "layer_2": {"a": np.zeros(2)}})


@pytest.mark.parametrize("name", ["llama"])  # RoBERTa: tests/test_runner.py's scanned run
def test_vera_on_the_scanned_zoo_model_equals_vera_on_the_unrolled_one(name, tmp_path):
    """The adapters read the "layers" axis from the scanned model's metadata: per-layer d (L, r) and
    b (L, out), the same outputs and gradients on the merged and factored paths, and adapter files
    that load onto the other layout."""
    hf_config = HF[name][0]().to_dict()
    unrolled = loader.random_model(hf_config, seed=1)
    scanned = loader.random_model(hf_config, seed=1, abstract=True, scan_layers=True)
    stacked = common.stack_layers(unrolled.params)
    config = vera_jax.VeraConfig(r=8, targets=("query", "value"), d_initial=0.5)
    twin = vera_jax.apply_vera(unrolled.params, config)
    adapted = vera_jax.apply_vera(common.boxed(stacked, scanned.param_axes), config)
    assert adapted.adapter["layer"]["attention"]["query"]["lambda_d"].shape == (3, 8)
    # train b away from zero the same way in both layouts, so the adapter term shows
    twin = twin.replace(adapter=jax.tree.map(lambda x: x + 0.3, twin.adapter))
    adapted = adapted.replace(adapter=jax.tree.map(lambda x: x + 0.3, adapted.adapter))
    args, _ = inputs(name)
    for path in ("merged", "factored"):
        outs = []
        for model, a in ((unrolled.module, twin), (scanned.module, adapted)):
            def loss(trainable, a=a, model=model, path=path):
                out = vera_jax.apply_adapted(model, vera_jax.combine(trainable, vera_jax.partition(a)[1]), *args,
                                             path=path, train=False)
                return jnp.sum(out * jax.random.normal(jax.random.key(0), out.shape)), out

            outs.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(vera_jax.partition(a)[0]))
        ((_, want), grads), ((_, got), scanned_grads) = outs
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=path)
        jax.tree.map(lambda x, y, p=path: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4, err_msg=p),
                     common.unstack_layers(scanned_grads.adapter), grads.adapter)
    vera_jax.save_adapter(tmp_path / "scanned", adapted)
    loaded = vera_jax.load_adapter(tmp_path / "scanned", unrolled.params)
    jax.tree.map(np.testing.assert_allclose, loaded.adapter, twin.adapter)


def test_runner_trains_the_scanned_model_as_the_unrolled_one(tmp_path):
    """config.model.scan_layers through the runner: VeRA on the scanned BERT trains to the unrolled
    run's evals and adapter (model dropout off: nn.scan draws per-layer dropout keys its own way)."""
    from tests.test_runner import TOY, toy_config

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 12, "hidden_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 16,
        "type_vocab_size": 1, "pad_token_id": 0, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}))
    summaries = {}
    for scan in (False, True):
        config = toy_config(str(tmp_path / "ckpt"))
        config.model.scan_layers = scan
        config.num_epochs = 1.0
        summaries[scan] = runner.run(TOY, config, str(tmp_path / str(scan)))
    assert [e["accuracy"] for e in summaries[True]["evals"]] == [e["accuracy"] for e in summaries[False]["evals"]]
    assert summaries[True]["adapter_params"] == summaries[False]["adapter_params"] == 2 * 2 * (4 + 16)
    unrolled = load_file(str(tmp_path / "False" / "adapter" / "adapter_model.safetensors"))
    scanned = load_file(str(tmp_path / "True" / "adapter" / "adapter_model.safetensors"))
    assert sorted(scanned) == sorted(unrolled)
    for key in unrolled:
        np.testing.assert_allclose(scanned[key], unrolled[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_server_serves_the_scanned_base(tmp_path):
    """`python -m vera_jax.serving --scan-layers`: the engine decodes the stacked cache (one index per
    slot) and answers as the unrolled model's greedy decoding."""
    testclient = pytest.importorskip("fastapi.testclient")
    from tests._serving_tiny import alone, save_checkpoint, tiny
    from vera_jax.serving.__main__ import build, parse_args

    model, params, hf_config = tiny("llama")
    save_checkpoint(tmp_path / "ckpt", "llama", params, hf_config)
    app, engine, bank = build(parse_args(["--checkpoint", str(tmp_path / "ckpt"), "--scan-layers", "--slots", "2",
                                          "--max-length", "32"]))
    assert engine.model.scan_layers and "layer" in bank.params
    with testclient.TestClient(app) as client:
        answers = [client.post("/v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 4,
                                                        "temperature": 0}) for prompt in ([5, 6, 7], [9, 4])]
    for prompt, answer in zip(([5, 6, 7], [9, 4]), answers):
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["token_ids"] == alone(model, params, prompt, 4)


def test_benchmark_scan_layers_cli_records_both_layouts_per_depth(capsys, tmp_path):
    """`python -m experiments.benchmark --scan_layers`: per depth, compile and step of both layouts
    (timings not asserted: the machine's load decides them) and a zero loss gap (same weights)."""
    from experiments.benchmark import __main__ as cli

    cli.FLAGS(["benchmark", "--scan_layers", "--scan_depths=1,2", "--hidden=32", "--batch=1", "--seq=8", "--iters=1",
               "--warmup=0", "--format=markdown", f"--json={tmp_path / 'scan.json'}"])
    try:
        cli.main(["benchmark"])
    finally:
        cli.FLAGS.unparse_flags()
    record = json.loads((tmp_path / "scan.json").read_text())
    assert record["mode"] == "scan" and record["methods"] == ["floor"] and list(record["depths"]) == ["1", "2"]
    for row in record["depths"].values():
        assert row["loss_gap"] < 1e-5
        r = row["floor"]
        assert r["scanned"]["compile_s"] > 0 and r["unrolled"]["step_ms"] > 0
        assert r["step_scanned_vs_unrolled"] == pytest.approx(r["scanned"]["step_ms"] / r["unrolled"]["step_ms"])
    assert set(record["compile_growth"]["floor"]) == {"scanned", "unrolled"}
    table = capsys.readouterr().out
    assert "| floor | 2 |" in table and "Compile time at 2 layers over 1 (floor)" in table


def test_scanned_load_onto_a_mesh_places_the_stacked_params(saved):
    """from_pretrained(mesh=..., scan_layers=True): each tensor read and cast alone, then stacked and
    sharded as the scanned model's logical axes say ("layers" replicated); the plain load's values."""
    from vera_jax import sharding, train

    path, _ = saved("llama")
    config = train.default_config()
    _, placed, _ = from_pretrained(path, mesh=sharding.make_mesh(config.mesh),
                                   rules=tuple(tuple(r) for r in config.mesh.rules), scan_layers=True)
    _, plain, _ = from_pretrained(path, scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, placed, plain)
    assert placed["layer"]["attention"]["query"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor")
