"""The ablation switches of VeraConfig, each checked for exactly what it changes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vera_jax


def _params():
    rng = np.random.default_rng(0)
    dense = lambda i, o: {"kernel": jnp.asarray(rng.standard_normal((i, o)), jnp.float32), "bias": jnp.zeros(o)}  # noqa: E731
    return {"layer_0": {"query": dense(8, 12), "value": dense(12, 6)},
            "layer_1": {"query": dense(6, 10), "value": dense(10, 4)},
            "classifier": dense(4, 2)}


def _forward(params, x):
    for i in range(2):
        layer = params[f"layer_{i}"]
        x = jnp.tanh(x @ layer["query"]["kernel"] + layer["query"]["bias"])
        x = x @ layer["value"]["kernel"] + layer["value"]["bias"]
    return x @ params["classifier"]["kernel"]


def _perturbed(config):
    adapted = vera_jax.apply_vera(_params(), config)
    leaves, treedef = jax.tree.flatten(adapted.adapter)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return adapted.replace(
        adapter=treedef.unflatten([v + 0.3 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]))


def test_unshared_projections_give_each_layer_its_own_exact_size_pair(tmp_path):
    config = vera_jax.VeraConfig(r=4, share_projections=False)
    adapted = _perturbed(config)
    own = adapted.projections["layer_0"]["value"]
    assert own["A"].shape == (4, 12) and own["B"].shape == (6, 4)
    assert not np.allclose(adapted.projections["layer_1"]["query"]["A"][:, :6],
                           adapted.projections["layer_0"]["query"]["A"][:, :6])
    alone = vera_jax.apply_vera(_params(), config.replace(targets=("value",)))
    np.testing.assert_array_equal(alone.projections["layer_0"]["value"]["A"], own["A"])
    assert vera_jax.count_trainable(adapted) == vera_jax.count_trainable(
        vera_jax.apply_vera(_params(), vera_jax.VeraConfig(r=4)))
    x = jnp.ones((3, 8))
    merged = vera_jax.merge(adapted)
    spec = adapted.layers[0]
    vec = vera_jax.adapters.core.get_path(adapted.adapter, spec.path)
    p = vera_jax.adapters.core.get_path(adapted.projections, spec.path)
    delta = (p["A"].T * vec["lambda_d"]) @ (p["B"].T * vec["lambda_b"])
    np.testing.assert_allclose(vera_jax.adapters.core.get_path(merged, spec.path)["kernel"],
                               vera_jax.adapters.core.get_path(_params(), spec.path)["kernel"] + delta,
                               rtol=1e-5, atol=1e-6)
    vera_jax.save_adapter(tmp_path, adapted)
    np.testing.assert_array_equal(_forward(vera_jax.merge(vera_jax.load_adapter(tmp_path, _params())), x),
                                  _forward(merged, x))


@pytest.mark.parametrize("init, check", [
    ("kaiming_normal",
     lambda a, fan: abs(a.std() / np.sqrt(2 / fan) - 1) < 0.05 and np.abs(a).max() > np.sqrt(6 / fan)),
    ("uniform",
     lambda a, fan: np.abs(a).max() <= 1.0 and np.abs(a).max() > 0.99 and abs(a.std() - 1 / np.sqrt(3)) < 0.02),
])
def test_projection_init_variants(init, check):
    p = vera_jax.make_projections(0, 64, 400, 300, init)
    assert check(np.asarray(p["A"]), 400) and check(np.asarray(p["B"]), 64)
    default = vera_jax.make_projections(0, 64, 400, 300)
    assert vera_jax.fingerprint(p) != vera_jax.fingerprint(default)
    adapted = vera_jax.apply_vera(_params(), vera_jax.VeraConfig(r=4, projection_init=init))
    assert adapted.config.projection_init == init


def test_only_b_freezes_d_everywhere(tmp_path):
    config = vera_jax.VeraConfig(r=4, train_d=False)
    adapted = _perturbed(config)
    trainable, frozen = vera_jax.partition(adapted)
    assert trainable.adapter["layer_0"]["query"]["lambda_d"] is None
    assert frozen.adapter["layer_0"]["query"]["lambda_d"] is not None
    assert vera_jax.count_trainable(adapted) == 12 + 6 + 10 + 4
    grads = jax.grad(lambda t: _forward(vera_jax.merge(vera_jax.combine(t, frozen)), jnp.ones((2, 8))).sum())(trainable)
    assert grads.adapter["layer_1"]["value"]["lambda_d"] is None
    vera_jax.save_adapter(tmp_path, adapted)
    from safetensors.numpy import load_file

    assert not any("lambda_d" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = vera_jax.load_adapter(tmp_path, _params())
    np.testing.assert_array_equal(loaded.adapter["layer_0"]["query"]["lambda_d"], jnp.full(4, 0.1))
    np.testing.assert_array_equal(loaded.adapter["layer_0"]["query"]["lambda_b"],
                                  adapted.adapter["layer_0"]["query"]["lambda_b"])


def test_only_d_needs_a_nonzero_frozen_b():
    with pytest.raises(ValueError, match=r"VeraConfig.b_initial: train_b=False with b_initial=0"):
        vera_jax.VeraConfig(train_b=False)
    adapted = vera_jax.apply_vera(_params(), vera_jax.VeraConfig(r=4, train_b=False, b_initial=1.0))
    assert vera_jax.count_trainable(adapted) == 4 * 4
    np.testing.assert_array_equal(adapted.adapter["layer_0"]["value"]["lambda_b"], jnp.ones(6))
    x = jnp.ones((2, 8))
    # b=1, d=0.1: not the base
    assert np.abs(_forward(vera_jax.merge(adapted), x) - _forward(_params(), x)).max() > 1e-4
    with pytest.raises(ValueError, match=r"at least one of the vectors must train"):
        vera_jax.VeraConfig(train_d=False, train_b=False, b_initial=1.0)


@pytest.mark.parametrize("d_initial", [1.0, 1e-7])
def test_d_initial_sets_every_d(d_initial):
    adapted = vera_jax.apply_vera(_params(), vera_jax.VeraConfig(r=4, d_initial=d_initial))
    d = [layer["lambda_d"] for block in adapted.adapter.values() for layer in block.values()]
    assert len(d) == 4 and all(np.all(v == np.float32(d_initial)) for v in d)


def test_bad_ablation_values_name_the_field():
    with pytest.raises(ValueError, match=r"VeraConfig.projection_init: 'orthogonal' is not one of"):
        vera_jax.VeraConfig(projection_init="orthogonal")
    with pytest.raises(ValueError, match=r"VeraConfig.share_projections: expected True or False"):
        vera_jax.VeraConfig(share_projections=0)


def test_full_fine_tuning_file_holds_every_leaf(tmp_path):
    params = _params()
    adapted = vera_jax.apply_full(params)
    adapted = adapted.replace(base=jax.tree.map(lambda x: x + 1.0, adapted.base))
    vera_jax.save_adapter(tmp_path, adapted)
    loaded = vera_jax.load_adapter(tmp_path, params)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded.base, adapted.base))
