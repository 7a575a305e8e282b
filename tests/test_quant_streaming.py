"""Streamed quantized loading (`hub.from_pretrained(quantize=...)`, used by the runner for
model.quantize nf4/int8): leaf for leaf the same tree as `quant.quantize_params` of the plain load
(1 and 2 devices), one float tensor alive at a time, the header-only safetensors reader, the errors,
and `experiments/load_memory.py`'s figures."""

from __future__ import annotations

import json
import weakref

import jax
import ml_dtypes
import numpy as np
import pytest
from _devices import run_child
from safetensors.numpy import save_file

from experiments import load_memory
from vera_jax import quant
from vera_jax.models import hub

# 2 layers of 64 wide (GQA: 2 of 4 heads for keys/values), shards of <= 40 KiB: 7 files
TINY = dict(layers=2, hidden=64, intermediate=128, vocab=128, heads=4, kv_heads=2, shard_mb=0.04)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A float32 LLaMA checkpoint in several shards (model.safetensors.index.json)."""
    return load_memory.write_checkpoint(str(tmp_path_factory.mktemp("llama") / "f32"), **TINY)["directory"]


def assert_same_tree(expected, got):
    """Same tree (quantized kernel types and their static fields included), bit-equal leaves."""
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)):
        name = jax.tree_util.keystr(path)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.parametrize("method,dtype", [("nf4", "float32"), ("int8", "float32"), ("nf4", "bfloat16")])
def test_streamed_load_equals_quantize_params(checkpoint, tmp_path, method, dtype):
    if dtype != "float32":
        checkpoint = load_memory.write_checkpoint(str(tmp_path / dtype), dtype=dtype, **TINY)["directory"]
    assert len(hub.safetensors_files(checkpoint)) > 3
    _, plain, _ = hub.from_pretrained(checkpoint)
    expected = quant.quantize_params(plain, method)
    _, streamed, _ = hub.from_pretrained(checkpoint, quantize=method)
    assert_same_tree(expected, streamed)
    cls = {"nf4": quant.NF4Kernel, "int8": quant.Int8Kernel}[method]
    assert isinstance(streamed["layer_1"]["down"]["kernel"], cls)
    assert not quant.is_quantized(streamed["lm_head"]["kernel"])
    assert quant.param_bytes(streamed) == quant.param_bytes(expected)


def test_streamed_load_keeps_skipped_modules(checkpoint):
    skip = quant.DEFAULT_SKIP + ("down",)
    _, plain, _ = hub.from_pretrained(checkpoint)
    _, streamed, _ = hub.from_pretrained(checkpoint, quantize="int8", quantize_skip=skip)
    assert_same_tree(quant.quantize_params(plain, "int8", skip=skip), streamed)
    assert not quant.is_quantized(streamed["layer_0"]["down"]["kernel"])


def test_streamed_load_holds_one_float_kernel_at_a_time(checkpoint, monkeypatch):
    """Every stored tensor is read once, and when one is read, no earlier kernel that was
    quantized is still alive as a host array (refcounting frees it before the next read)."""
    read_array = hub.StoredTensor.__array__
    reads, alive = [], []

    def tracked(self, dtype=None, copy=None):
        quantized = [name for name, ref in reads if ref() is not None and name.endswith("proj.weight")]
        alive.append(quantized)
        out = read_array(self, dtype, copy)
        reads.append((self.name, weakref.ref(out)))
        return out

    monkeypatch.setattr(hub.StoredTensor, "__array__", tracked)
    monkeypatch.setattr(hub, "read_safetensors", lambda path: pytest.fail("the whole checkpoint was read"))
    _, params, _ = hub.from_pretrained(checkpoint, quantize="nf4")
    names = [name for name, _ in reads]
    assert sorted(names) == sorted(hub.stored_tensors(checkpoint)) and len(set(names)) == len(names)
    assert all(not a for a in alive), [a for a in alive if a]
    assert len(quant.quantized_paths(params)) == 2 * 7


def test_stored_tensors_read_what_safetensors_reads(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"f16": rng.normal(size=(3, 5)).astype(np.float16),
               "bf16": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16),
               "i8": rng.integers(-9, 9, (2, 2, 3)).astype(np.int8), "flag": np.array([True, False]),
               "scalar": np.array(3.5, np.float32), "empty": np.zeros((0, 4), np.float32)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    stored = hub.stored_tensors(str(tmp_path))
    assert set(stored) == set(tensors)
    for name, value in hub.read_safetensors(str(tmp_path)).items():
        got = np.asarray(stored[name])
        assert (got.dtype, got.shape) == (value.dtype, value.shape), name
        np.testing.assert_array_equal(got, value, err_msg=name)


def test_stored_tensor_errors_name_the_file_and_tensor(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"w": np.ones((4, 4), np.float32)}, str(file))
    data = file.read_bytes()
    file.write_bytes(data[:-8])  # the tensor's last two values cut off
    with pytest.raises(ValueError, match=r"model.safetensors: tensor w \(F32 \[4, 4\]\) has data offsets"):
        hub.stored_tensors(str(tmp_path))
    header = json.dumps({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    file.write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
    with pytest.raises(ValueError, match=r"tensor w has dtype 'F4'; supported: \['BF16'"):
        hub.stored_tensors(str(tmp_path))
    file.write_bytes(b"\xff" * 12)
    with pytest.raises(ValueError, match="not a safetensors file"):
        hub.stored_tensors(str(tmp_path))


def test_bad_streaming_options_name_the_argument(checkpoint):
    with pytest.raises(ValueError, match=r"quantize 'int4' is not one of \[None, 'nf4', 'int8'\]"):
        hub.from_pretrained(checkpoint, quantize="int4")
    with pytest.raises(ValueError, match="quantize_skip is given but quantize is None"):
        hub.from_pretrained(checkpoint, quantize_skip=("lm_head",))
    with pytest.raises(ValueError, match="rules is given but mesh is None"):
        hub.from_pretrained(checkpoint, quantize="nf4", rules=(("embed", "fsdp"),))
    with pytest.raises(ValueError, match="mesh is given but rules is None"):
        hub.from_pretrained(checkpoint, quantize="nf4", mesh=jax.sharding.Mesh(jax.devices()[:1], ("data",)))
    with pytest.raises(ValueError, match=r"quantize 'nf4' with quantize_skip \['.\*'\] matched no linear module"):
        hub.from_pretrained(checkpoint, quantize="nf4", quantize_skip=(".*",))


def test_runner_loads_safetensors_streamed(checkpoint, monkeypatch):
    from vera_jax.tasks import runner
    from vera_jax.train import default_config

    config = default_config()
    config.method, config.seed, config.network_timeout = "vera", 0, 1.0
    config.model = runner.model_config()
    config.model.checkpoint, config.model.head, config.model.quantize = checkpoint, (), "nf4"
    _, plain, _ = hub.from_pretrained(checkpoint)
    expected = quant.quantize_params(plain, "nf4")
    monkeypatch.setattr(hub, "read_safetensors", lambda path: pytest.fail("the runner read the whole checkpoint"))
    monkeypatch.setattr(quant, "quantize_params", lambda *a, **k: pytest.fail("the runner quantized the float tree"))
    model = runner.load_model(config)
    assert_same_tree(expected, model.params)
    assert isinstance(model.param_axes["layer_0"]["attention"]["query"]["kernel"], quant.NF4Kernel)


def test_streamed_load_shards_on_two_devices(checkpoint):
    """fsdp=2 over 2 simulated devices: each leaf lands with the trainer's sharding (codes split),
    and the values are the single-device plain path's (nf4, int8, and float with a mesh alone)."""
    out = run_child("test_quant_streaming", checkpoint, devices=2, timeout=120)
    assert out["devices"] == 2 and "fsdp" in out["codes_spec"], out


def child(checkpoint: str) -> None:
    """Child-process entry (2 devices): nf4, int8 and float (mesh alone) against the plain load."""
    import flax.linen as nn

    from vera_jax.train import default_config, make_mesh, param_shardings

    cfg = default_config().mesh
    cfg.data, cfg.fsdp = 1, 2
    mesh = make_mesh(cfg)
    model, plain, _ = hub.from_pretrained(checkpoint)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 2), np.int32)))
    for method in ("nf4", "int8", None):
        expected = plain if method is None else quant.quantize_params(plain, method)
        _, streamed, _ = hub.from_pretrained(checkpoint, quantize=method, mesh=mesh, rules=cfg.rules)
        assert_same_tree(expected, streamed)
        axes = quant.quantized_axes(expected, nn.get_partition_spec(boxed)["params"])
        want = param_shardings(expected, axes, mesh, cfg.rules)
        for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(streamed), jax.tree.leaves(want)):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (method, jax.tree_util.keystr(path))
        if method == "nf4":
            codes = streamed["layer_0"]["attention"]["query"]["kernel"].codes
    print(json.dumps({"devices": len(codes.sharding.device_set), "codes_spec": str(codes.sharding.spec)}))


def test_load_memory_reports_both_modes(checkpoint):
    full, streamed = (load_memory.measure(checkpoint, mode) for mode in load_memory.MODES)
    for out in (full, streamed):
        for field in ("peak_rss_bytes", "rss_after_imports_bytes", "loaded_bytes", "quantized_kernel_bytes",
                      "params", "load_s"):
            assert out[field] > 0, (out["mode"], field)
        assert out["peak_rss_bytes"] >= out["rss_after_imports_bytes"]
    assert streamed["loaded_bytes"] == full["loaded_bytes"] and streamed["params"] == full["params"]


def test_load_memory_refuses_bad_shapes_naming_the_flag(tmp_path, capsys):
    with pytest.raises(ValueError, match="--hidden 96: must be a multiple of 64"):
        load_memory.write_checkpoint(str(tmp_path), layers=1, hidden=96, intermediate=128, vocab=8, heads=4)
    with pytest.raises(SystemExit):
        load_memory.main(["--workdir", str(tmp_path), "--modes", "full,half"])
    assert "--modes 'full,half'" in capsys.readouterr().err
