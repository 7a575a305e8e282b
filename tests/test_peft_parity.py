"""Against HF PEFT's VeRA on a small random RobertaForSequenceClassification: the same layers are
targeted, A/B have PEFT's shapes, and with A, B, d, b copied across every adapted layer computes
PEFT's output (formula and slicing), on layers of different shapes."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import vera_jax  # noqa: E402
from vera_jax.adapters.core import get_path  # noqa: E402

PEFT_TARGETS = ["query", "value", "intermediate.dense", "output.dense"]


def _peft_model(layers_to_transform=None):
    torch.manual_seed(0)
    config = transformers.RobertaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=40, num_labels=3,
    )
    base = transformers.RobertaForSequenceClassification(config).eval()
    vera = peft.VeraConfig(r=8, target_modules=PEFT_TARGETS, d_initial=0.1, projection_prng_key=0,
                           layers_to_transform=layers_to_transform)
    model = peft.get_peft_model(base, vera).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, peft.tuners.vera.layer.Linear):
                module.vera_lambda_d["default"].normal_()
                module.vera_lambda_b["default"].normal_()
    return model


def _flax_params(model):
    """Every torch Linear as a Flax Dense module at the same path ('.' -> '/'), kernel = W.T."""
    params: dict = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, torch.nn.Linear):
            path = [p for p in name.split(".") if p != "base_layer"]
            node = params
            for p in path:
                node = node.setdefault(p, {})
            node["kernel"] = jnp.asarray(module.weight.detach().numpy().T)
            node["bias"] = jnp.asarray(module.bias.detach().numpy())
    return params


def _peft_layers(model):
    return {name.removeprefix("base_model.model.").replace(".", "/"): m
            for name, m in model.named_modules() if isinstance(m, peft.tuners.vera.layer.Linear)}


@pytest.mark.parametrize("layers_to_transform", [None, [1]])
def test_same_layers_shapes_and_outputs_as_peft(layers_to_transform):
    model = _peft_model(layers_to_transform)
    params = _flax_params(model)
    config = vera_jax.VeraConfig(r=8, targets=[t.replace(".", "/") for t in PEFT_TARGETS],
                                 layers_to_transform=layers_to_transform)
    adapted = vera_jax.apply_vera(params, config)
    peft_layers = _peft_layers(model)
    assert sorted(s.name for s in adapted.layers) == sorted(peft_layers)
    assert len({s.kernel_shape for s in adapted.layers}) == 3

    vera_a = model.base_model.vera_A["default"].numpy()
    vera_b = model.base_model.vera_B["default"].numpy()
    assert adapted.projections["A"].shape == vera_a.shape and adapted.projections["B"].shape == vera_b.shape
    adapter: dict = {}
    for name, layer in peft_layers.items():
        node = adapter
        for p in name.split("/"):
            node = node.setdefault(p, {})
        node["lambda_d"] = jnp.asarray(layer.vera_lambda_d["default"].detach().numpy())
        node["lambda_b"] = jnp.asarray(layer.vera_lambda_b["default"].detach().numpy())
    adapted = adapted.replace(adapter=adapter, projections={"A": jnp.asarray(vera_a), "B": jnp.asarray(vera_b)})

    merged = vera_jax.merge(adapted)
    rng = np.random.default_rng(0)
    for spec in adapted.layers:
        x = rng.standard_normal((3, 7, spec.in_features)).astype(np.float32)
        with torch.no_grad():
            expected = peft_layers[spec.name](torch.from_numpy(x)).numpy()
        module = get_path(merged, spec.path)
        np.testing.assert_allclose(x @ np.asarray(module["kernel"]) + np.asarray(module["bias"]), expected,
                                   rtol=1e-5, atol=1e-5)
        base = get_path(params, spec.path)
        factored = x @ np.asarray(base["kernel"]) + np.asarray(base["bias"]) + np.asarray(
            vera_jax.adapters.factored.layer_term(adapted, spec, jnp.asarray(x)))
        np.testing.assert_allclose(factored, expected, rtol=1e-5, atol=1e-5)


def test_peft_trainable_count_matches_ours():
    model = _peft_model()
    adapted = vera_jax.apply_vera(_flax_params(model),
                                  vera_jax.VeraConfig(r=8, targets=[t.replace(".", "/") for t in PEFT_TARGETS]))
    peft_count = sum(p.numel() for n, p in model.named_parameters() if "vera_lambda" in n)
    assert vera_jax.count_trainable(adapted) == peft_count
