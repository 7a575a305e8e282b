"""The adapter-method registry: a toy method added from this file alone, DVoRA, per-shape
projections, and no method-name comparisons left in the library."""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import ClassVar

import _train_tiny as tiny
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vera_jax
from vera_jax import train as vtrain
from vera_jax.serving import AdapterBank, AdapterRefused

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILTIN = ("vera", "lora", "dvora", "head", "full")


def test_no_method_name_comparisons_in_the_library():
    names = "|".join(BUILTIN)
    patterns = [re.compile(rf'(==|!=|\bin)\s*\(?\s*"({names})"'), re.compile(rf'"({names})"\s*(==|!=|\bin\b)'),
                re.compile(r"\.method\s*(==|!=)"), re.compile(r"\.method\s+(not\s+)?in\s*[(\[{]")]
    found = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
             for path in sorted((ROOT / "vera_jax").rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if any(p.search(line) for p in patterns)]
    assert not found, "method-name comparisons (ask vera_jax.get_method instead):\n" + "\n".join(found)


# ---- a toy method, with the public API only: a trained scalar per layer times a frozen random rank-1 update
@dataclasses.dataclass(frozen=True)
class ScaleConfig(vera_jax.MethodConfig):
    method: ClassVar[str] = "toy_scale"
    targets: tuple = ("query", "value")
    seed: int = 0
    trainable_extra: tuple = ()


def _scale_init(params, config, layers):
    key = jax.random.key(config.seed)
    adapter, projections = {}, {}
    for i, spec in enumerate(layers):
        ku, kv = jax.random.split(jax.random.fold_in(key, i))
        adapter[spec.name] = {"scale": jnp.zeros((1,), jnp.float32)}
        projections[spec.name] = {"u": jax.random.normal(ku, (spec.in_features,)),
                                  "v": jax.random.normal(kv, (spec.out_features,))}
    return adapter, projections


def _uv(adapted, spec):
    pair = adapted.projections[spec.name]
    return pair["u"], pair["v"]


TOY = vera_jax.Method(
    name="toy_scale", config_class=ScaleConfig, init=_scale_init,
    delta=lambda adapted, spec, vec, dtype: vec["scale"] * jnp.outer(*_uv(adapted, spec)),
    term=lambda adapted, spec, vec, x: vec["scale"] * (x @ _uv(adapted, spec)[0])[..., None] * _uv(adapted, spec)[1],
)


@pytest.fixture
def toy_registered():
    vera_jax.register_method(TOY)
    yield TOY
    vera_jax.unregister_method(TOY.name)


def _tiny_params():
    return jax.jit(tiny.Tiny().init)(jax.random.PRNGKey(0), jnp.zeros((1, tiny.FEATURES)))["params"]


def _task(adapted):
    model = tiny.Tiny()

    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}

    def eval_fn(params, batch):
        return {"pred": model.apply({"params": params}, batch["x"]).argmax(-1), "label": batch["label"]}

    return vtrain.Task(adapted=adapted, loss_fn=loss_fn, train_data=grain.MapDataset.source(tiny.examples(64, 1)),
                       eval_data=grain.MapDataset.source(tiny.examples(16, 2)), eval_fn=eval_fn,
                       metrics_fn=lambda out: {"accuracy": float((out["pred"] == out["label"]).mean())}, name="toy")


def test_a_method_registered_from_a_test_file_trains_saves_loads_and_is_refused_by_the_bank(toy_registered, tmp_path):
    params = jax.tree.map(lambda x: x, vera_jax.adapters.core._plain(_tiny_params()))
    adapted = vera_jax.attach(params, ScaleConfig(trainable_extra=("classifier",)))
    assert vera_jax.count_trainable(adapted) == 2 + sum(x.size for x in jax.tree.leaves(params["classifier"]))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, tiny.FEATURES)), jnp.float32)
    trained = adapted.replace(adapter=jax.tree.map(lambda s: s + 0.3, adapted.adapter))
    merged = tiny.Tiny().apply({"params": vera_jax.merge(trained)}, x)
    factored = vera_jax.apply_factored(tiny.Tiny(), trained, x)
    np.testing.assert_allclose(merged, factored, rtol=1e-5, atol=1e-5)

    config = tiny.override(tiny.tiny_config(4), {"optimizer.warmup_steps": 0})
    result = vtrain.train_and_evaluate(config, str(tmp_path / "run"), _task(adapted))
    scales = [float(v["scale"][0]) for v in result.adapted.adapter.values()]
    assert all(s != 0.0 for s in scales), scales

    vera_jax.save_adapter(tmp_path / "adapter", result.adapted)
    loaded = vera_jax.load_adapter(tmp_path / "adapter", params)
    assert loaded.method == "toy_scale" and loaded.config == result.adapted.config
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(result.adapted)):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(AdapterRefused, match="method 'toy_scale' is refused"):
        AdapterBank(params).load("toy", tmp_path / "adapter")
    with pytest.raises(ValueError, match="method 'toy_scale' is not a PEFT adapter"):
        vera_jax.save_peft_adapter(tmp_path / "peft", loaded, {"model_type": "bert"})


def test_registry_errors_name_what_is_wrong(toy_registered, tmp_path):
    with pytest.raises(ValueError, match="already registered"):
        vera_jax.register_method(TOY)
    with pytest.raises(ValueError, match="class attribute method = 'other'"):
        vera_jax.Method(name="other", config_class=ScaleConfig, init=_scale_init, term=TOY.term)
    with pytest.raises(KeyError, match="'nope' is not registered; known: .*toy_scale"):
        vera_jax.get_method("nope")
    vera_jax.save_adapter(tmp_path / "a", vera_jax.attach(_tiny_params(), ScaleConfig()))
    vera_jax.unregister_method("toy_scale")
    try:
        with pytest.raises(vera_jax.AdapterFileError, match="unknown method 'toy_scale'.*register"):
            vera_jax.load_adapter(tmp_path / "a", _tiny_params())
    finally:
        vera_jax.register_method(TOY)


# ---- DVoRA
def _dvora(**kw):
    return vera_jax.apply_dvora(_tiny_params(), vera_jax.DVoraConfig(r=4, trainable_extra=("classifier",), **kw))


def _x():
    return jnp.asarray(np.random.default_rng(1).normal(size=(5, tiny.FEATURES)), jnp.float32)


def _perturbed(adapted, seed=3):
    leaves, tree = jax.tree.flatten(adapted.adapter)
    rng = np.random.default_rng(seed)
    return adapted.replace(adapter=jax.tree.unflatten(
        tree, [x + jnp.asarray(rng.normal(scale=0.2, size=x.shape), jnp.float32) for x in leaves]))


def test_dvora_starts_equal_to_the_base_and_its_magnitude_is_the_column_norm():
    adapted = _dvora()
    base = tiny.Tiny().apply({"params": adapted.base}, _x())
    np.testing.assert_allclose(tiny.Tiny().apply({"params": vera_jax.merge(adapted)}, _x()), base, atol=1e-6)
    np.testing.assert_allclose(vera_jax.apply_factored(tiny.Tiny(), adapted, _x()), base, atol=1e-6)
    kernel = adapted.base["query"]["kernel"]
    np.testing.assert_allclose(adapted.adapter["query"]["magnitude"], np.linalg.norm(kernel, axis=0), rtol=1e-6)
    assert set(adapted.adapter["query"]) == {"lambda_d", "lambda_b", "magnitude"}


def test_dvora_merged_equals_factored_and_gradients_reach_m_d_b():
    adapted = _perturbed(_dvora())
    x, model = _x(), tiny.Tiny()
    merged = model.apply({"params": vera_jax.merge(adapted)}, x)
    np.testing.assert_allclose(vera_jax.apply_factored(model, adapted, x), merged, rtol=1e-5, atol=1e-5)
    kernel = np.asarray(adapted.base["query"]["kernel"], np.float64)
    w = kernel + np.asarray(vera_jax.adapters.core.layer_projections(adapted, adapted.layers[0])[0]).T \
        @ np.diag(np.asarray(adapted.adapter["query"]["lambda_d"])) \
        @ (np.asarray(vera_jax.adapters.core.layer_projections(adapted, adapted.layers[0])[1])
           * np.asarray(adapted.adapter["query"]["lambda_b"])[:, None]).T
    expected = w * np.asarray(adapted.adapter["query"]["magnitude"]) / np.linalg.norm(w, axis=0)
    np.testing.assert_allclose(vera_jax.merge(adapted)["query"]["kernel"], expected, rtol=1e-5, atol=1e-6)

    trainable, frozen = vera_jax.partition(adapted)
    for path in ("merged", "factored"):
        grads = jax.grad(lambda t, path=path: vera_jax.call_adapted(
            lambda p: model.apply({"params": p}, x).sum(), vera_jax.combine(t, frozen), path=path))(trainable)
        for leaf in ("magnitude", "lambda_d", "lambda_b"):
            assert float(jnp.abs(grads.adapter["value"][leaf]).sum()) > 0, (path, leaf)
    labels = vera_jax.optax_labels(adapted).adapter["query"]
    assert labels == {"lambda_d": "adapter", "lambda_b": "adapter", "magnitude": "adapter"}


def test_dvora_file_round_trip_cost_and_refusals(tmp_path):
    adapted = _perturbed(_dvora())
    vera_jax.save_adapter(tmp_path / "dvora", adapted)
    loaded = vera_jax.load_adapter(tmp_path / "dvora", _tiny_params())
    assert loaded.method == "dvora" and loaded.config == adapted.config
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapted)):
        np.testing.assert_array_equal(a, b)
    vera = vera_jax.layer_costs(64, 32, 32, 4, "vera")
    dvora = vera_jax.layer_costs(64, 32, 32, 4, "dvora")
    assert dvora["merged"] > vera["merged"] and dvora["factored"] > vera["factored"]
    with pytest.raises(ValueError, match="method 'dvora' is not a PEFT adapter"):
        vera_jax.save_peft_adapter(tmp_path / "peft", adapted, {"model_type": "bert"})
    with pytest.raises(AdapterRefused, match="method 'dvora' is refused"):
        AdapterBank(_tiny_params()).load("d", tmp_path / "dvora")
    with pytest.raises(TypeError, match="expected a VeraConfig, got DVoraConfig"):
        vera_jax.apply_vera(_tiny_params(), vera_jax.DVoraConfig(r=4))


# ---- per-shape projections
def test_per_shape_projections_one_pair_per_kernel_shape(tmp_path):
    params = _tiny_params()
    config = vera_jax.VeraConfig(r=4, targets=("query", "value"), projections="per_shape")
    adapted = vera_jax.apply_vera(params, config)
    n, h = tiny.FEATURES, tiny.HIDDEN
    assert {k: (v["A"].shape, v["B"].shape) for k, v in adapted.projections.items()} == {
        f"{n}x{h}": ((4, n), (h, 4)), f"{h}x{h}": ((4, h), (h, 4))}
    # a shape's pair does not depend on which other shapes are adapted
    alone = vera_jax.apply_vera(params, config.replace(targets=("value",)))
    np.testing.assert_array_equal(alone.projections[f"{h}x{h}"]["A"], adapted.projections[f"{h}x{h}"]["A"])
    shared = vera_jax.apply_vera(params, config.replace(projections="shared"))
    assert vera_jax.fingerprint(shared.projections) != vera_jax.fingerprint(adapted.projections)

    trained = _perturbed(adapted)
    x, model = _x(), tiny.Tiny()
    np.testing.assert_allclose(vera_jax.apply_factored(model, trained, x),
                               model.apply({"params": vera_jax.merge(trained)}, x), rtol=1e-5, atol=1e-5)
    vera_jax.save_adapter(tmp_path / "ps", trained)
    loaded = vera_jax.load_adapter(tmp_path / "ps", params)
    assert loaded.config.projections == "per_shape"
    np.testing.assert_array_equal(model.apply({"params": vera_jax.merge(loaded)}, x),
                                  model.apply({"params": vera_jax.merge(trained)}, x))

    with pytest.raises(ValueError, match="projections='per_shape'.*PEFT"):
        vera_jax.save_peft_adapter(tmp_path / "peft", trained, {"model_type": "bert"})
    assert AdapterBank(params).add("ps", trained).r == 4       # served: the group keeps one pair per shape
    with pytest.raises(ValueError, match="VeraConfig.projections: 'per_layer' is not one of"):
        vera_jax.VeraConfig(projections="per_layer")
    with pytest.raises(ValueError, match="VeraConfig.projections, VeraConfig.share_projections"):
        vera_jax.VeraConfig(projections="per_shape", share_projections=False)
