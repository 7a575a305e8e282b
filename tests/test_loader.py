"""The model loader (vera_jax.models.loader): spec checks that name the field, random and abstract
models, dtype. Real checkpoints through it are covered by test_runner, test_quant*, test_gguf and
test_serving_main."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from vera_jax import quant
from vera_jax.models import hub, loader

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64)


@pytest.mark.parametrize("fields, message", [
    (dict(checkpoint=""), "model.checkpoint: empty"),
    (dict(quantize="fp8"), r"model.quantize: expected one of \['', 'nf4', 'int8', 'gguf'\], got 'fp8'"),
    (dict(dtype="float64"), r"model.dtype: expected one of \['float32', 'bfloat16', 'float16'\]"),
    (dict(overrides={"num_hidden_layers": 1}), "model.overrides: only with model.random_init=True"),
])
def test_spec_errors_name_the_field(fields, message):
    with pytest.raises(loader.ConfigError, match=message):
        loader.ModelSpec(**{"checkpoint": "llama-7b", **fields})


def test_mesh_needs_rules():
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    with pytest.raises(ValueError, match="mesh is given without rules"):
        loader.ModelSpec("x", mesh=mesh)


def test_random_model_abstract_allocates_nothing():
    model = loader.random_model({**hub.bundled_config("llama-7b"), **TINY}, abstract=True)
    kernel = model.params["layer_0"]["attention"]["query"]["kernel"]
    assert isinstance(kernel, jax.ShapeDtypeStruct) and kernel.shape == (64, 64)
    assert model.param_axes["layer_0"]["attention"]["query"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads")


def test_bundled_random_init_in_bfloat16_quantized():
    """A bundled config needs no files (resolve gives None); dtype sets the params', quantize keeps
    the linear kernels quantized with the logical axes of their codes."""
    spec = loader.ModelSpec("llama-7b", random_init=True, overrides=TINY, dtype="bfloat16", quantize="int8")
    assert loader.resolve(spec) is None
    model = loader.load_model(spec)
    assert model.params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    assert isinstance(model.params["layer_0"]["attention"]["query"]["kernel"], quant.Int8Kernel)
    assert isinstance(model.param_axes["layer_0"]["attention"]["query"]["kernel"], quant.Int8Kernel)
    assert model.path == "llama-7b" and model.hf_config["num_hidden_layers"] == 1
