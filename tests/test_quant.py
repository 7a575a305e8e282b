"""A quantized frozen base (vera_jax.quant): NF4/int8 round trips, bytes per parameter from
eval_shape, one trainer step on a 4-bit tiny LLaMA against the dequantized float32 base (1 and 2
devices), a b ~ 1e-4 adapter surviving, merged refused, auto factoring, generation and the runner."""

from __future__ import annotations

import json

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from _devices import run_child

import vera_jax
from vera_jax import quant
from vera_jax.adapters import factored
from vera_jax.models import generate, llama

TINY = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64}
# One step on the 4-bit base against the same step on its dequantized float32 copy: the kernels are
# the same numbers, so only summation order differs (dequantize-in-jit vs stored, the float32
# adapter term): observed max |diff| 4.7e-8 (VeRA, nf4; 4e-6 relative on a lambda_b ~1e-2), 0 (LoRA,
# int8), losses equal.
STEP_RTOL, STEP_ATOL = 1e-5, 1e-7


def tiny_llama():
    model = llama.build(TINY)
    boxed = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, nn.unbox(boxed), nn.get_partition_spec(boxed)


def tokens(n=16, length=8, seed=1):
    return np.random.default_rng(seed).integers(1, TINY["vocab_size"], (n, length)).astype(np.int32)


def test_nf4_round_trip_within_codebook_bound():
    w = np.random.default_rng(0).normal(0, 0.02, (256, 96)).astype(np.float32)
    w[:64, :3] *= 40  # blocks with outliers
    q = quant.quantize_nf4(w)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (128, 96) and q.absmax.dtype == jnp.int8
    back = np.asarray(q.dequantize())
    absmax = np.abs(w.reshape(4, 64, 96)).max(axis=1)
    absmax_hat = (np.asarray(q.absmax, np.float32) * np.repeat(np.asarray(q.absmax_scale), 32, axis=1)
                  + float(q.absmax_offset))
    # nearest code: half the widest codebook gap times the block absmax, plus what the double
    # quantization moved that absmax by (|code| <= 1)
    bound = quant.NF4_MAX_GAP / 2 * absmax + np.abs(absmax - absmax_hat) + 1e-7
    err = np.abs(w - back).reshape(4, 64, 96)
    assert (err <= bound[:, None, :]).all()
    assert (err.max(axis=1) > 0.5 * bound).mean() > 0.5  # the bound is nearly reached in most blocks
    i8 = quant.quantize_int8(w)
    assert (np.abs(w - np.asarray(i8.dequantize())) <= np.asarray(i8.scale) / 2 + 1e-7).all()


def test_nf4_block_size_must_divide_the_input():
    with pytest.raises(ValueError, match="block_size 64 must be even and divide the input size 96 of up"):
        quant.quantize_nf4(np.zeros((96, 8), np.float32), 64, "up")
    with pytest.raises(ValueError, match="method 'int4' is not one of"):
        quant.quantize_params({"d": {"kernel": np.zeros((64, 8))}}, "int4")


def test_bytes_per_parameter_from_eval_shape():
    """0.5 for the codes + 1/64 for the int8 block absmax + the float32 second-level scales."""
    model, params, _ = tiny_llama()
    shapes = jax.eval_shape(lambda p: quant.quantize_params(p, "nf4"), params)
    report = quant.param_bytes(shapes)
    assert report["quantized_params"] == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 2 + 128 * 64)
    assert 0.5 + 1 / 64 < report["quantized_bytes_per_param"] < 0.52, report  # 0.5173 (out 32..128 < 256)
    assert report["bytes"] == quant.param_bytes(quant.quantize_params(params, "nf4"))["bytes"]
    int8 = quant.param_bytes(jax.eval_shape(lambda p: quant.quantize_params(p, "int8"), params))
    assert 1.0 < int8["quantized_bytes_per_param"] <= 1 + 4 / 64


def lm_task(adapted, param_axes=None):
    from vera_jax.train import Task

    model = llama.build(TINY)

    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["ids"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["ids"][:, 1:]).mean()
        return loss, {}

    data = grain.MapDataset.source([{"ids": row} for row in tokens()])
    return Task(adapted=adapted, loss_fn=loss_fn, train_data=data, param_axes=param_axes, name="lm")


def step_config(path="factored", **mesh):
    from vera_jax.train import default_config

    c = default_config()
    c.num_train_steps, c.batch_size, c.eval_batch_size = 1, 8, 8
    c.adapter_path = path
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 0
    c.checkpoint_async, c.tensorboard, c.progress_bar = False, False, False
    c.data_threads, c.data_prefetch = 1, 1
    for k, v in mesh.items():
        c.mesh[k] = v
    return c


def one_step(workdir, base: str, path="factored", method="vera", **mesh) -> dict:
    """One trainer step of VeRA (r=16, q/v) or LoRA (all linear but lm_head) on the tiny LLaMA with
    `base` "nf4" | "int8" | "dequantized:nf4" (the same numbers as float32 kernels)."""
    from vera_jax.train import train_and_evaluate

    _, params, axes = tiny_llama()
    method_q = base.rpartition(":")[2]
    qparams = quant.quantize_params(params, method_q)
    if base.startswith("dequantized"):
        params = quant.dequantize_params(qparams)
    else:
        params, axes = qparams, quant.quantized_axes(qparams, axes)
    if method == "vera":
        adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=16, targets=("query", "value"), b_initial=1e-3))
    else:
        adapted = vera_jax.apply_lora(params, vera_jax.LoraConfig(
            r=8, targets=("query", "key", "value", "attn_out", "gate", "up", "down")))
    result = train_and_evaluate(step_config(path, **mesh), str(workdir), lm_task(adapted, axes))
    leaves = jax.tree_util.tree_flatten_with_path(vera_jax.partition(result.adapted)[0])[0]
    return {"loss": result.summary["final"]["train"]["train/loss"],
            **{jax.tree_util.keystr(k): np.asarray(v).tolist() for k, v in leaves}}


def assert_same_step(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=STEP_RTOL, atol=STEP_ATOL, err_msg=k)


@pytest.mark.parametrize("method,base,path", [("vera", "nf4", "factored"), ("vera", "nf4", "auto"),
                                              ("lora", "int8", "factored")])
def test_one_step_on_quantized_base_equals_dequantized_float_base(tmp_path, method, base, path):
    quantized = one_step(tmp_path / "q", base, path, method)
    reference = one_step(tmp_path / "f", "dequantized:" + base, "factored", method)
    assert_same_step(quantized, reference)
    start = {"vera": 1e-3, "lora": 0.0}[method]
    moved = [k for k in quantized if "lambda_b" in k or "lora_B" in k]
    assert moved and all(np.abs(np.asarray(quantized[k]) - start).max() > 0 for k in moved)


def test_one_step_on_two_devices_shards_the_quantized_base(tmp_path):
    """fsdp=2 over 2 simulated devices: codes and block scales are split like the kernels."""
    args = json.dumps({"workdir": str(tmp_path / "fsdp2"), "base": "nf4", "mesh": {"data": 1, "fsdp": 2}})
    sharded = run_child("test_quant", args, devices=2)
    assert "fsdp" in json.dumps(sharded.pop("codes_sharding"))
    assert_same_step(sharded, one_step(tmp_path / "one", "nf4"))


def child(args: str) -> None:
    """Child-process entry (2 devices): the step, and how a query kernel's codes were placed."""
    from vera_jax.train import default_config, make_mesh, param_shardings

    a = json.loads(args)
    out = one_step(a["workdir"], a["base"], **a["mesh"])
    _, params, axes = tiny_llama()
    qparams = quant.quantize_params(params, "nf4")
    mesh_cfg = default_config().mesh
    for k, v in a["mesh"].items():
        mesh_cfg[k] = v
    shardings = param_shardings(qparams, quant.quantized_axes(qparams, axes), make_mesh(mesh_cfg), mesh_cfg.rules)
    spec = shardings["layer_0"]["attention"]["query"]["kernel"].codes.spec
    assert any(part is not None for part in spec), spec  # the codes are split, not replicated
    print(json.dumps({**out, "codes_sharding": [p if p is None or isinstance(p, str) else list(p) for p in spec]}))


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_tiny_adapter_update_survives_quantized_base(method):
    """b = 1e-4 changes the logits of a quantized model by what it changes the float model by;
    merged into the NF4 grid instead, the same update would vanish."""
    model, params, _ = tiny_llama()
    qparams = quant.quantize_params(params, method)
    fparams = quant.dequantize_params(qparams)
    ids = jnp.asarray(tokens(2))
    config = vera_jax.VeraConfig(r=16, targets=("query", "value"), b_initial=1e-4)

    def delta(p):
        run = jax.jit(lambda a: vera_jax.apply_adapted(model, a, ids, path="factored"))
        on, off = run(vera_jax.apply_vera(p, config)), run(vera_jax.apply_vera(p, config.replace(b_initial=0.0)))
        return np.asarray(on - off)

    dq, df = delta(qparams), delta(fparams)
    assert np.abs(dq).max() > 1e-5
    np.testing.assert_allclose(dq, df, rtol=0.05, atol=2e-6)
    if method == "nf4":
        adapted = vera_jax.apply_vera(fparams, config)
        spec = adapted.layers[0]
        w = fparams["layer_0"]["attention"]["query"]["kernel"]
        merged = quant.quantize_nf4(w + vera_jax.layer_delta(adapted, spec))
        np.testing.assert_array_equal(np.asarray(merged.codes), np.asarray(quant.quantize_nf4(w).codes))


def test_merged_on_quantized_layer_raises_naming_the_layer():
    model, params, _ = tiny_llama()
    adapted = vera_jax.apply_vera(quant.quantize_params(params, "nf4"), vera_jax.VeraConfig(r=4, targets=("query",)))
    ids = jnp.asarray(tokens(1))
    with pytest.raises(ValueError, match=r"layer layer_0/attention/query has a quantized kernel \(nf4\)"):
        vera_jax.apply_adapted(model, adapted, ids, path="merged")
    with pytest.raises(ValueError, match="layer_0/attention/query"):
        generate.greedy(model, adapted, ids, jnp.ones_like(ids), 2, None, 0, path="merged")
    with pytest.raises(ValueError, match="quantized kernel, which stays frozen"):
        vera_jax.partition(vera_jax.apply_full(quant.quantize_params(params, "int8"), ("query",)))


def test_auto_factors_quantized_layers(monkeypatch):
    """r=256 over 64x64 kernels at 512 tokens: the cost model merges on a float base, never on a
    quantized one."""
    model, params, _ = tiny_llama()
    assert vera_jax.choose_path(512, 64, 64, 256) == "merged"
    merged = []
    real = factored.merged_kernel
    monkeypatch.setattr(factored, "merged_kernel", lambda a, s, *rest: merged.append(s.name) or real(a, s, *rest))
    ids = jnp.asarray(tokens(64))  # 64 x 8 = 512 tokens
    config = vera_jax.VeraConfig(r=256, targets=("query",), b_initial=1e-3)
    y_float = vera_jax.apply_adapted(model, vera_jax.apply_vera(params, config), ids, path="auto")
    assert merged == ["layer_0/attention/query", "layer_1/attention/query"]
    merged.clear()
    qparams = quant.quantize_params(params, "nf4")
    y_auto = vera_jax.apply_adapted(model, vera_jax.apply_vera(qparams, config), ids, path="auto")
    assert merged == []
    y_fact = vera_jax.apply_adapted(model, vera_jax.apply_vera(qparams, config), ids, path="factored")
    np.testing.assert_array_equal(np.asarray(y_auto), np.asarray(y_fact))
    assert np.isfinite(np.asarray(y_float)).all()


def test_greedy_decodes_on_quantized_base():
    model, params, _ = tiny_llama()
    qparams = quant.quantize_params(params, "nf4")
    fparams = quant.dequantize_params(qparams)
    ids = jnp.asarray(tokens(2, 5))
    mask = jnp.ones_like(ids)
    config = vera_jax.VeraConfig(r=16, targets=("query", "value"), b_initial=0.05)
    out = {}
    for name, p, path in [("q_factored", qparams, "factored"), ("q_auto", qparams, "auto"),
                          ("f_factored", fparams, "factored")]:
        out[name] = np.asarray(generate.greedy(model, vera_jax.apply_vera(p, config), ids, mask, 6, None, 0, path=path))
    plain_q = generate.greedy(model, qparams, ids, mask, 6, None, 0)
    plain_f = generate.greedy(model, fparams, ids, mask, 6, None, 0)
    assert out["q_factored"].shape == (2, 6)
    np.testing.assert_array_equal(out["q_factored"], out["f_factored"])
    np.testing.assert_array_equal(out["q_auto"], out["f_factored"])
    np.testing.assert_array_equal(np.asarray(plain_q), np.asarray(plain_f))


def runner_config(quantize: str, path="factored", method="vera"):
    from vera_jax.tasks import runner
    from vera_jax.train import default_config

    c = default_config()
    c.method, c.seed, c.network_timeout = method, 0, 1.0
    c.model = runner.model_config()
    c.model.checkpoint, c.model.random_init, c.model.head = "llama-7b", True, ()
    c.model.overrides = ml_collections.ConfigDict({k: v for k, v in TINY.items() if k != "max_position_embeddings"})
    c.model.quantize = quantize
    c.adapter_path = path
    c.vera = runner.method_config(vera_jax.VeraConfig, r=8)      # what a family's config declares
    c.lr = ml_collections.ConfigDict({"vera": 1e-2, "head": 1e-3, "full": 1e-5})
    return c


def test_runner_model_quantize():
    from vera_jax.tasks import runner

    model = runner.load_model(runner_config("nf4"))
    kernel = model.params["layer_0"]["attention"]["query"]["kernel"]
    assert isinstance(kernel, quant.NF4Kernel) and kernel.shape == (64, 64)
    assert not quant.is_quantized(model.params["lm_head"]["kernel"])
    assert isinstance(model.param_axes["layer_0"]["up"]["kernel"], quant.NF4Kernel)
    runner._validate(runner_config("int8", "auto"))
    for config, field in [(runner_config("nf4", "merged"), "adapter_path: 'merged'"),
                          (runner_config("int4"), "model.quantize: expected one of"),
                          (runner_config("nf4", method="full"), "method: 'full'")]:
        with pytest.raises(runner.ConfigError, match=field):
            runner._validate(config)


def write_gguf(path, qtype, width=64, inner=128, vocab=32):
    """A 2-layer LLaMA GGUF whose matrices are stored as `qtype` (norms F32), no tokenizer."""
    import gguf

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [("block_count", 2), ("context_length", 64), ("embedding_length", width),
                       ("feed_forward_length", inner), ("head_count", 4), ("head_count_kv", 2),
                       ("rope_dimension_count", width // 4), ("layer_norm_rms_eps", 1e-5), ("vocab_size", vocab)]:
        getattr(writer, f"add_{add}")(value)

    def matrix(name, rows, cols):
        w = (rng.normal(size=(rows, cols)) * 0.2).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)

    matrix("token_embd.weight", vocab, width)
    matrix("output.weight", vocab, width)
    writer.add_tensor("output_norm.weight", np.ones(width, np.float32))
    for i in range(2):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(width, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(width, np.float32))
        for name, rows, cols in [("attn_q", width, width), ("attn_k", width // 2, width), ("attn_v", width // 2, width),
                                 ("attn_output", width, width), ("ffn_gate", inner, width), ("ffn_up", inner, width),
                                 ("ffn_down", width, inner)]:
            matrix(f"blk.{i}.{name}.weight", rows, cols)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.mark.parametrize("qtype,bytes_per_param", [("Q4_0", 18 / 32), ("Q4_1", 20 / 32)])
def test_gguf_q4_base_stays_4bit(tmp_path, qtype, bytes_per_param):
    """The file's Q4_0/Q4_1 blocks as kernels: the same logits as the dequantized load, 18 or 20
    bytes per 32 weights in memory, and a VeRA adapter decodes on it (factored)."""
    import gguf

    from vera_jax.models import from_pretrained
    from vera_jax.models import gguf as gguf_io

    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", getattr(gguf.GGMLQuantizationType, qtype))
    model, params, _ = from_pretrained(path)
    kept = gguf_io.keep_4bit(params, path)
    kernel = kept["layer_0"]["attention"]["key"]["kernel"]
    assert isinstance(kernel, quant.GGUFQ4Kernel) and kernel.shape == (64, 32) and kernel.codes.dtype == jnp.uint8
    assert not quant.is_quantized(kept["lm_head"]["kernel"])
    reference = params["layer_0"]["attention"]["key"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel.dequantize()), np.asarray(reference))
    assert quant.param_bytes(kept)["quantized_bytes_per_param"] == pytest.approx(bytes_per_param)
    ids = jnp.asarray(tokens(2, 6) % 32)
    with quant.dequantized():
        logits = jax.jit(lambda p: model.apply({"params": p}, ids))(kept)
    expected = model.apply({"params": params}, ids)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)
    config = vera_jax.VeraConfig(r=8, targets=("query", "value"), b_initial=0.05)
    out_q, out_f = (generate.greedy(model, vera_jax.apply_vera(p, config), ids, jnp.ones_like(ids), 4, None, 0,
                                    path="factored") for p in (kept, params))
    np.testing.assert_array_equal(np.asarray(out_q), np.asarray(out_f))


def test_runner_keeps_gguf_blocks(tmp_path):
    import gguf

    from vera_jax.tasks import runner

    config = runner_config("gguf")
    config.model.checkpoint = write_gguf(tmp_path / "tiny.gguf", gguf.GGMLQuantizationType.Q4_1)
    config.model.random_init, config.model.overrides = False, ml_collections.ConfigDict()
    model = runner.load_model(config)
    assert isinstance(model.params["layer_1"]["down"]["kernel"], quant.GGUFQ4Kernel)
    assert isinstance(model.param_axes["layer_1"]["down"]["kernel"], quant.GGUFQ4Kernel)
    config = runner_config("gguf")
    with pytest.raises(runner.ConfigError, match="model.quantize: 'gguf' keeps a .gguf file's 4-bit blocks"):
        runner.load_model(config)


def test_adapter_file_round_trip_on_quantized_base(tmp_path):
    _, params, _ = tiny_llama()
    qparams = quant.quantize_params(params, "nf4")
    adapted = vera_jax.apply_vera(qparams, vera_jax.VeraConfig(r=4, targets=("query", "value"), b_initial=0.1))
    vera_jax.save_adapter(tmp_path / "adapter", adapted)
    loaded = vera_jax.load_adapter(tmp_path / "adapter", qparams)
    assert loaded.layers == adapted.layers
    np.testing.assert_array_equal(np.asarray(loaded.adapter["layer_1"]["attention"]["value"]["lambda_b"]),
                                  np.asarray(adapted.adapter["layer_1"]["attention"]["value"]["lambda_b"]))
