"""Adapter files: what they hold, bit-exact reload in a fresh process, and every refusal."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import vera_jax
from vera_jax.adapters.directory import sha256

# Runs in separate interpreters: builds the same base params from a seed, then either trains
# nothing but writes a perturbed adapter and its logits ("save") or reloads it ("load").
SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, jax, flax.linen as nn
    import vera_jax

    class Block(nn.Module):
        width: int
        @nn.compact
        def __call__(self, x):
            return nn.Dense(self.width, name="value")(nn.tanh(nn.Dense(self.width + 3, name="query")(x)))

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = Block(20, name="layer_0")(x)
            x = Block(12, name="layer_1")(x)
            return nn.Dense(3, name="classifier")(x)

    mode, directory = sys.argv[1], sys.argv[2]
    model = Tiny()
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    params = model.init(jax.random.key(0), x)["params"]
    if mode == "save":
        adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=6, seed=11, trainable_extra=("classifier",)))
        leaves, treedef = jax.tree.flatten((adapted.adapter, adapted.base["classifier"]))
        keys = jax.random.split(jax.random.key(5), len(leaves))
        adapter, head = treedef.unflatten([v + 0.3 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])
        adapted = adapted.replace(adapter=adapter, base={**adapted.base, "classifier": head})
        vera_jax.save_adapter(directory, adapted)
    else:
        adapted = vera_jax.load_adapter(directory, params)
    logits = jax.jit(lambda a: model.apply({"params": vera_jax.merge(a)}, x))(adapted)
    np.save(f"{directory}/logits_{mode}.npy", np.asarray(logits))
    """
)


def _run(*args, env=None):
    subprocess.run([sys.executable, "-c", SCRIPT, *args], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapter")
    _run("save", str(directory))
    return directory


def _params():
    """The same tree shapes as SCRIPT's model, values irrelevant for the refusal tests."""
    block = lambda w, i: {"query": {"kernel": jnp.zeros((i, w + 3)), "bias": jnp.zeros(w + 3)},  # noqa: E731
                          "value": {"kernel": jnp.zeros((w + 3, w)), "bias": jnp.zeros(w)}}
    return {"layer_0": block(20, 8), "layer_1": block(12, 20),
            "classifier": {"kernel": jnp.zeros((12, 3)), "bias": jnp.zeros(3)}}


def test_reload_in_a_fresh_process_is_bit_exact(saved):
    _run("load", str(saved))
    np.testing.assert_array_equal(np.load(saved / "logits_load.npy"), np.load(saved / "logits_save.npy"))


def test_file_holds_r_plus_out_per_layer_and_the_head_only(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    record = json.loads((saved / "adapter_config.json").read_text())
    r = record["config"]["r"]
    per_layer = {"layer_0/query": 23, "layer_0/value": 20, "layer_1/query": 15, "layer_1/value": 12}
    expected = ({f"adapter/{p}/lambda_d": r for p in per_layer}
                | {f"adapter/{p}/lambda_b": o for p, o in per_layer.items()})
    expected |= {"head/classifier/kernel": 12 * 3, "head/classifier/bias": 3}
    assert {k: v.size for k, v in tensors.items()} == expected
    assert sum(v.size for v in tensors.values()) == sum(r + o for o in per_layer.values()) + 39
    assert record["config"]["seed"] == 11 and record["projections"]["shapes"] == {"A": [6, 23], "B": [23, 6]}
    assert len(record["projections"]["fingerprint"]) == 64
    assert [layer["kernel_shape"] for layer in record["layers"]] == [[8, 23], [23, 20], [20, 15], [15, 12]]
    assert not any(f.endswith((".bin", ".pkl", ".pickle")) for f in os.listdir(saved))


def test_save_projection_stores_a_and_b_and_loads_them(tmp_path):
    params = _params()
    adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=4, save_projection=True))
    vera_jax.save_adapter(tmp_path, adapted)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["projections/A"].shape == (4, 23) and tensors["projections/B"].shape == (23, 4)
    loaded = vera_jax.load_adapter(tmp_path, params)
    np.testing.assert_array_equal(loaded.projections["A"], adapted.projections["A"])


def test_lora_head_and_full_round_trip(tmp_path):
    params = jax.tree.map(lambda x: x + 1.0, _params())
    for i, adapted in enumerate([
        vera_jax.apply_lora(params, vera_jax.LoraConfig(r=2, alpha=4, trainable_extra=("classifier",))),
        vera_jax.apply_head(params),
    ]):
        adapted = adapted.replace(
            base={**adapted.base, "classifier": jax.tree.map(lambda x: x * 3.0, adapted.base["classifier"])})
        vera_jax.save_adapter(tmp_path / str(i), adapted)
        loaded = vera_jax.load_adapter(tmp_path / str(i), params)
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded, adapted))


def test_bfloat16_head_leaves_keep_their_dtype(tmp_path):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) + 0.5, _params())
    adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=2, trainable_extra=("classifier",)))
    vera_jax.save_adapter(tmp_path, adapted)
    loaded = vera_jax.load_adapter(tmp_path, params)
    assert loaded.base["classifier"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded.base["classifier"]["kernel"], adapted.base["classifier"]["kernel"])


def _copy(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        if not name.endswith(".npy"):
            (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_missing_directory_or_files(tmp_path, saved):
    with pytest.raises(vera_jax.AdapterFileError, match="adapter_config.json is missing"):
        vera_jax.load_adapter(tmp_path / "nothing", _params())
    d = _copy(saved, tmp_path / "a")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(vera_jax.AdapterFileError, match="adapter_model.safetensors is missing"):
        vera_jax.load_adapter(d, _params())


def test_corrupt_files(tmp_path, saved):
    d = _copy(saved, tmp_path / "truncated")
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(vera_jax.AdapterFileError, match="corrupt"):
        vera_jax.load_adapter(d, _params())
    d = _copy(saved, tmp_path / "badjson")
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(vera_jax.AdapterFileError, match="adapter_config.json is corrupt"):
        vera_jax.load_adapter(d, _params())


def _edit_record(d, edit):
    record = json.loads((d / "adapter_config.json").read_text())
    edit(record)
    (d / "adapter_config.json").write_text(json.dumps(record))


def test_fingerprint_mismatch_is_refused(tmp_path, saved):
    d = _copy(saved, tmp_path / "fp")
    _edit_record(d, lambda r: r["projections"].update(fingerprint="0" * 64))
    with pytest.raises(vera_jax.AdapterFileError, match="fingerprint mismatch.*rebuilt from seed 11"):
        vera_jax.load_adapter(d, _params())


def test_shape_mismatch_against_params_names_the_layer(saved):
    params = _params()
    params["layer_1"]["value"]["kernel"] = jnp.zeros((15, 13))
    with pytest.raises(vera_jax.AdapterFileError, match=r"layer_1/value: adapter \[15, 12\], params \[15, 13\]"):
        vera_jax.load_adapter(saved, params)
    del params["layer_1"]
    with pytest.raises(vera_jax.AdapterFileError, match=r"layer_1/query: adapter \[20, 15\], params absent"):
        vera_jax.load_adapter(saved, params)


def test_missing_and_unexpected_tensors_are_named(tmp_path, saved):
    d = _copy(saved, tmp_path / "tensors")
    tensors = load_file(d / "adapter_model.safetensors")
    tensors["adapter/layer_9/query/lambda_d"] = tensors.pop("adapter/layer_0/query/lambda_d")
    save_file(tensors, d / "adapter_model.safetensors")
    _edit_record(d, lambda r: r.update(tensors_sha256=sha256(d / "adapter_model.safetensors")))
    with pytest.raises(vera_jax.AdapterFileError, match=r"missing tensors \['adapter/layer_0/query/lambda_d'\], "
                                                        r"unexpected tensors \['adapter/layer_9/query/lambda_d'\]"):
        vera_jax.load_adapter(d, _params())


def test_unknown_method_or_config_field(tmp_path, saved):
    d = _copy(saved, tmp_path / "m")
    _edit_record(d, lambda r: r.update(method="dora"))
    with pytest.raises(vera_jax.AdapterFileError, match="unknown method 'dora'"):
        vera_jax.load_adapter(d, _params())
    d = _copy(saved, tmp_path / "f")
    _edit_record(d, lambda r: r["config"].update(rank=3))
    with pytest.raises(vera_jax.AdapterFileError, match=r"unknown field\(s\) \['rank'\]"):
        vera_jax.load_adapter(d, _params())
