"""`python -m vera_jax.serving` loads its base through the model loader: a tiny checkpoint a test
writes, served quantized (--quantize) or in another precision (--dtype), answers completions."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import vera_jax
from tests._serving_tiny import EOS, alone, random_vera, save_checkpoint
from vera_jax import quant
from vera_jax.models import llama
from vera_jax.serving.__main__ import build, parse_args

testclient = pytest.importorskip("fastapi.testclient")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 1-layer LLaMA 64 wide (NF4 quantizes blocks of 64 inputs) with an adapter."""
    root = tmp_path_factory.mktemp("serving_main")
    hf_config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, initializer_range=0.3, max_position_embeddings=64, bos_token_id=EOS,
        eos_token_id=EOS).to_dict()
    model = llama.build(hf_config)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    save_checkpoint(root / "ckpt", "llama", params, hf_config)
    adapted = random_vera(params, ("query", "value"), 0, 8, key=7)
    vera_jax.save_adapter(root / "a", adapted)
    return root, model, params


def test_quantized_server_answers_as_the_quantized_model(checkpoint, method="nf4"):
    root, model, params = checkpoint
    app, engine, bank = build(parse_args(["--checkpoint", str(root / "ckpt"), "--quantize", method,
                                          "--adapter", f"a={root / 'a'}", "--slots", "2", "--max-length", "32"]))
    assert isinstance(bank.params["layer_0"]["attention"]["query"]["kernel"], quant.QuantizedKernel)
    qparams = quant.quantize_params(params, method)
    with quant.dequantized():
        expected = alone(model, qparams, [5, 6, 7], 4)
    with testclient.TestClient(app) as client:
        answer = client.post("/v1/completions", json={"model": "base", "prompt": [5, 6, 7], "max_tokens": 4,
                                                      "temperature": 0})
        adapted = client.post("/v1/completions", json={"model": "a", "prompt": [5, 6, 7], "max_tokens": 4,
                                                       "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["token_ids"] == expected
    assert adapted.status_code == 200 and len(adapted.json()["choices"][0]["token_ids"]) >= 1, adapted.text


def test_dtype_loads_the_base_in_that_precision(checkpoint):
    root, _, _ = checkpoint
    app, engine, bank = build(parse_args(["--checkpoint", str(root / "ckpt"), "--dtype", "bfloat16",
                                          "--slots", "1", "--max-length", "32"]))
    assert bank.params["embed_tokens"]["embedding"].dtype == np.dtype("bfloat16")
    with testclient.TestClient(app) as client:
        answer = client.post("/v1/completions", json={"model": "base", "prompt": [5, 6], "max_tokens": 2,
                                                      "temperature": 0})
    assert answer.status_code == 200 and len(answer.json()["choices"][0]["token_ids"]) >= 1, answer.text


def test_bad_quantize_is_refused_naming_the_flag(checkpoint):
    root, _, _ = checkpoint
    with pytest.raises(SystemExit, match="--checkpoint: model.quantize: 'gguf' keeps a .gguf file's 4-bit blocks"):
        build(parse_args(["--checkpoint", str(root / "ckpt"), "--quantize", "gguf"]))
    with pytest.raises(SystemExit):
        parse_args(["--checkpoint", str(root / "ckpt"), "--quantize", "fp8"])
