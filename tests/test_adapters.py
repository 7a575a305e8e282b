"""The core transforms: merged == factored, gradients and labels, counts, configs and targets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vera_jax
from vera_jax import tree as tree_lib
from vera_jax.adapters.core import layer_projections


class Block(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(self.width + 3, name="query")(x))
        return nn.Dense(self.width, name="value")(h) + nn.Dense(self.width, name="key")(h)


class Tiny(nn.Module):
    """Targeted layers of four different shapes, so slicing of the shared A/B matters."""

    @nn.compact
    def __call__(self, x):
        x = Block(20, name="layer_0")(x)
        x = Block(12, name="layer_1")(x)
        return nn.Dense(3, name="classifier")(x)


class WithDenseGeneral(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 5), name="query")(x)  # kernel (8, 2, 5): one input axis
        return nn.DenseGeneral(7, axis=(-2, -1), name="out")(h)  # kernel (2, 5, 7): two input axes


def _x(shape=(2, 5, 8), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def _perturb(adapted, seed=2):
    """Non-trivial adapter values (b starts at zero, which would hide every bug)."""
    leaves, treedef = jax.tree.flatten(adapted.adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return adapted.replace(
        adapter=treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


@pytest.fixture(scope="module")
def tiny():
    model = Tiny()
    return model, model.init(jax.random.key(0), _x())["params"]


@pytest.mark.parametrize("method", ["vera", "lora"])
def test_merged_and_factored_agree_on_layers_of_different_shapes(tiny, method):
    model, params = tiny
    targets = ("query", "value", "key")
    if method == "vera":
        adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=6, targets=targets))
        assert adapted.projections["A"].shape == (6, 23) and adapted.projections["B"].shape == (23, 6)
    else:
        adapted = vera_jax.apply_lora(params, vera_jax.LoraConfig(r=3, alpha=6, targets=targets))
    assert len({s.kernel_shape for s in adapted.layers}) == 4
    adapted = _perturb(adapted)
    x = _x()
    merged = model.apply({"params": vera_jax.merge(adapted)}, x)
    factored = vera_jax.apply_factored(model, adapted, x)
    base = model.apply({"params": params}, x)
    np.testing.assert_allclose(merged, factored, rtol=1e-5, atol=1e-5)
    assert np.abs(merged - base).max() > 1e-2
    jitted = jax.jit(lambda a: model.apply({"params": vera_jax.merge(a)}, x))(adapted)
    np.testing.assert_allclose(jitted, merged, rtol=1e-6, atol=1e-6)


def test_fresh_adapter_is_the_identity(tiny):
    model, params = tiny
    x = _x()
    for adapted in (vera_jax.apply_vera(params, vera_jax.VeraConfig(r=4)),
                    vera_jax.apply_lora(params, vera_jax.LoraConfig())):
        np.testing.assert_array_equal(model.apply({"params": vera_jax.merge(adapted)}, x),
                                      model.apply({"params": params}, x))


def test_merge_is_exactly_w0_plus_delta(tiny):
    _, params = tiny
    adapted = _perturb(vera_jax.apply_vera(params, vera_jax.VeraConfig(r=5)))
    merged = vera_jax.merge(adapted)
    spec = adapted.layers[1]
    a = np.asarray(adapted.projections["A"])[:, : spec.in_features]
    b = np.asarray(adapted.projections["B"])[: spec.out_features]
    vec = adapted.adapter["layer_0"]["value"]
    delta = (a.T * np.asarray(vec["lambda_d"])) @ (b.T * np.asarray(vec["lambda_b"]))
    np.testing.assert_allclose(merged["layer_0"]["value"]["kernel"], params["layer_0"]["value"]["kernel"] + delta,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merged["classifier"]["kernel"], params["classifier"]["kernel"])


def test_merged_gradient_by_the_hand_written_vjp_equals_autodiff_and_bfloat16_stays_close(tiny):
    """`vera_delta`'s VJP (two products reduced against the frozen A/B) against autodiff of the
    plain expression; with bfloat16 compute the deltas' products run on bfloat16 operands with
    float32 accumulation, and the gradient stays within bfloat16's rounding of the float32 one."""
    model, params = tiny
    adapted = _perturb(vera_jax.apply_vera(params, vera_jax.VeraConfig(r=5)))
    trainable, frozen = vera_jax.partition(adapted)
    x = _x()

    def loss(t, dtype=None):
        merged = vera_jax.merge(vera_jax.combine(t, frozen), dtype)
        cast = jax.tree.map(lambda p: p.astype(dtype or jnp.float32), merged)
        return jnp.sum(model.apply({"params": cast}, x.astype(dtype or jnp.float32)).astype(jnp.float32) ** 2)

    def reference(vectors):
        out = jax.tree.map(lambda p: p, params)
        for spec in adapted.layers:
            a, b = layer_projections(adapted, spec)
            vec = tree_lib.get_path(vectors, spec.path)
            kernel = tree_lib.get_path(out, spec.path)["kernel"]
            delta = (a.T * vec["lambda_d"]) @ (b.T * vec["lambda_b"][None, :])
            tree_lib.set_path(out, spec.path, {**tree_lib.get_path(out, spec.path), "kernel": kernel + delta})
        return jnp.sum(model.apply({"params": out}, x) ** 2)

    ours = jax.grad(loss)(trainable)
    ref = jax.grad(lambda t: reference(vera_jax.combine(t, frozen).adapter))(trainable)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    half = jax.grad(lambda t: loss(t, jnp.bfloat16))(trainable)
    for got, want in zip(jax.tree.leaves(half), jax.tree.leaves(ours)):
        scale = float(jnp.max(jnp.abs(want)))
        assert float(jnp.max(jnp.abs(got - want))) <= 0.05 * scale
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda t: loss(t, jnp.bfloat16)))(trainable))
    assert "preferred_element_type=float32" in jaxpr


def test_dense_general_kernels_flatten_by_the_in_axes_rule():
    model = WithDenseGeneral()
    x = _x((3, 8))
    params = model.init(jax.random.key(0), x)["params"]
    # more than two axes need a rule: one input axis for query (the rest outputs), two for out
    with pytest.raises(ValueError, match=r"stacked_axes: module query has a kernel of shape \(8, 2, 5\) whose axes"):
        vera_jax.apply_vera(params, vera_jax.VeraConfig(r=4, targets=("query",)))
    config = vera_jax.VeraConfig(r=4, targets=("query", "out"), kernel_in_axes={"query": 1, "out": 2})
    adapted = _perturb(vera_jax.apply_vera(params, config))
    assert sorted((s.name, s.in_features, s.out_features) for s in adapted.layers) == [("out", 10, 7), ("query", 8, 10)]
    np.testing.assert_allclose(
        model.apply({"params": vera_jax.merge(adapted)}, x), vera_jax.apply_factored(model, adapted, x),
        rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="kernel_in_axes"):
        vera_jax.apply_vera(params, vera_jax.VeraConfig(targets=("query",), kernel_in_axes={"query": 3}))


def test_grad_only_for_trainable_leaves_and_labels_drive_two_learning_rates(tiny):
    model, params = tiny
    adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=4, trainable_extra=("classifier",)))
    trainable, frozen = vera_jax.partition(adapted)
    x = _x()

    def loss(t):
        return jnp.mean(model.apply({"params": vera_jax.merge(vera_jax.combine(t, frozen))}, x) ** 2)

    grads = jax.grad(loss)(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert grads.projections == {"A": None, "B": None}
    assert grads.base["layer_0"]["query"] == {"bias": None, "kernel": None}
    assert set(grads.base["classifier"]) == {"bias", "kernel"}
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.abs(grads.adapter["layer_1"]["value"]["lambda_b"]).max() > 0

    tx = optax.multi_transform({"adapter": optax.sgd(1.0), "head": optax.sgd(0.0)}, vera_jax.optax_labels(adapted))
    state = tx.init(trainable)
    assert sum(x.size for x in jax.tree.leaves(state)) == 0  # sgd keeps no state; checks the trees line up
    updates, _ = tx.update(grads, state, trainable)
    new = optax.apply_updates(trainable, updates)
    np.testing.assert_array_equal(new.base["classifier"]["kernel"], trainable.base["classifier"]["kernel"])
    assert np.abs(new.adapter["layer_1"]["value"]["lambda_b"]
                  - trainable.adapter["layer_1"]["value"]["lambda_b"]).max() > 0

    adam = optax.multi_transform({"adapter": optax.adam(1e-2), "head": optax.adam(1e-3)},
                                 vera_jax.optax_labels(adapted))
    n_state = sum(x.size for x in jax.tree.leaves(adam.init(trainable)) if x.ndim)
    assert n_state == 2 * vera_jax.count_trainable(adapted)  # Adam's two moments, trainable leaves only


def test_trainable_count_is_layers_times_two_times_d_model_plus_r():
    d_model, r, n_layers = 16, 8, 3

    params = {f"layer_{i}": {name: {"kernel": jnp.zeros((d_model, d_model)), "bias": jnp.zeros(d_model)}
                             for name in ("query", "key", "value")} for i in range(n_layers)}
    params["classifier"] = {"kernel": jnp.zeros((d_model, 2)), "bias": jnp.zeros(2)}
    adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=r))
    assert vera_jax.count_trainable(adapted) == n_layers * 2 * (d_model + r)
    with_head = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=r, trainable_extra=("classifier",)))
    assert vera_jax.count_trainable(with_head) == n_layers * 2 * (d_model + r) + d_model * 2 + 2
    lora = vera_jax.apply_lora(params, vera_jax.LoraConfig(r=r))
    assert vera_jax.count_trainable(lora) == n_layers * 2 * r * (d_model + d_model)
    assert vera_jax.count_trainable(vera_jax.apply_head(params)) == d_model * 2 + 2
    full = vera_jax.apply_full(params)
    assert vera_jax.count_trainable(full) == sum(x.size for x in jax.tree.leaves(params))
    labels = set(jax.tree.leaves(vera_jax.optax_labels(full)))
    assert labels == {"full", "head"}


def test_target_selection_names_regex_and_layers(tiny):
    _, params = tiny
    names = lambda cfg: sorted(s.name for s in vera_jax.find_targets(params, cfg))  # noqa: E731
    assert names(vera_jax.VeraConfig(targets="value")) == ["layer_0/value", "layer_1/value"]
    assert names(vera_jax.VeraConfig(targets=("layer_1/query",))) == ["layer_1/query"]
    assert names(vera_jax.VeraConfig(targets=r"layer_\d/(key|value)")) == [
        "layer_0/key", "layer_0/value", "layer_1/key", "layer_1/value"]
    assert names(vera_jax.VeraConfig(targets=r"layer_\d/k.*")) == ["layer_0/key", "layer_1/key"]
    assert names(vera_jax.VeraConfig(layers_to_transform=1)) == ["layer_1/query", "layer_1/value"]
    with pytest.raises(ValueError, match=r"VeraConfig.targets.*matched no linear module.*layer_0/query"):
        vera_jax.apply_vera(params, vera_jax.VeraConfig(targets=("uery",)))
    with pytest.warns(UserWarning, match=r"targets: \['attention/output/dense'\] matched no linear module \(the other"):
        assert names(vera_jax.VeraConfig(targets=("query", "attention/output/dense"))) == [
            "layer_0/query", "layer_1/query"]
    with pytest.raises(ValueError, match=r"in layers \[7\]"):
        vera_jax.apply_vera(params, vera_jax.VeraConfig(layers_to_transform=[7]))
    with pytest.raises(ValueError, match=r"trainable_extra.*matched no module"):
        vera_jax.apply_vera(params, vera_jax.VeraConfig(trainable_extra=("head",)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, r"VeraConfig.r: expected an integer >= 1"),
        ({"r": 2.5}, r"VeraConfig.r"),
        ({"d_initial": float("nan")}, r"VeraConfig.d_initial: expected a finite number"),
        ({"d_initial": float("inf")}, r"VeraConfig.d_initial"),
        ({"targets": ()}, r"VeraConfig.targets: must not be empty"),
        ({"targets": ("query", "")}, r"VeraConfig.targets: every entry must be a non-empty string"),
        ({"targets": ("qu(ery",)}, r"VeraConfig.targets: 'qu\(ery' is not a valid pattern"),
        ({"rank": 4}, r"VeraConfig: unknown field\(s\) \['rank'\]; allowed: \['r', 'targets'"),
        ({"dropout": 1.0}, r"VeraConfig.dropout"),
        ({"seed": -1}, r"VeraConfig.seed"),
        ({"layers_to_transform": []}, r"VeraConfig.layers_to_transform: must not be empty"),
        ({"save_projection": "yes"}, r"VeraConfig.save_projection"),
    ],
)
def test_bad_vera_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vera_jax.VeraConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, r"LoraConfig.r"),
        ({"alpha": 0}, r"LoraConfig.alpha: expected a number > 0"),
        ({"targets": []}, r"LoraConfig.targets"),
        ({"d_initial": 0.1}, r"LoraConfig: unknown field\(s\) \['d_initial'\]"),
    ],
)
def test_bad_lora_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vera_jax.LoraConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_keys():
    config = vera_jax.VeraConfig(r=16, targets=["query"], layers_to_transform=[0, 2], kernel_in_axes={"out": 2})
    assert vera_jax.VeraConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(vera_jax.VeraConfig.from_dict(config.to_dict()))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['alpha'\]"):
        vera_jax.VeraConfig.from_dict({**config.to_dict(), "alpha": 1})


def test_wrong_config_type_and_wrong_params():
    with pytest.raises(TypeError, match="expected a VeraConfig"):
        vera_jax.apply_vera({}, vera_jax.LoraConfig())
    with pytest.raises(TypeError, match="params: expected a Flax params dict"):
        vera_jax.apply_vera(jnp.zeros(3))


def test_adapter_dropout_only_with_a_dropout_rng(tiny):
    model, params = tiny
    adapted = _perturb(vera_jax.apply_vera(params, vera_jax.VeraConfig(r=4, dropout=0.5)))
    x = _x()
    eval_out = vera_jax.apply_factored(model, adapted, x)
    np.testing.assert_allclose(eval_out, model.apply({"params": vera_jax.merge(adapted)}, x), rtol=1e-5, atol=1e-5)
    train_out = vera_jax.apply_factored(model, adapted, x, dropout_rng=jax.random.key(3))
    assert np.abs(train_out - eval_out).max() > 1e-3
    again = vera_jax.apply_factored(model, adapted, x, dropout_rng=jax.random.key(3))
    np.testing.assert_array_equal(train_out, again)


def test_factored_path_refuses_a_model_that_never_calls_the_layer(tiny):
    _, params = tiny
    adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=4))

    class Other(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="classifier")(x)

    other_params = {**params}
    with pytest.raises(ValueError, match="never called"):
        vera_jax.apply_factored(Other(), adapted.replace(base=other_params), jnp.ones((1, 12)))


def test_tree_helpers_keep_non_string_keys():
    tree = {"layers": {0: {"q": {"kernel": 1}}, 1: {"q": {"kernel": 2}}}, "head": 3}
    flat = tree_lib.flatten(tree)
    assert list(flat) == [("layers", 0, "q", "kernel"), ("layers", 1, "q", "kernel"), ("head",)]
    assert tree_lib.unflatten(flat) == tree
    assert tree_lib.get_path(tree, ("layers", 1, "q")) == {"kernel": 2}
    tree_lib.set_path(tree, ("layers", 2, "q"), {"kernel": 4})
    assert tree["layers"][2] == {"q": {"kernel": 4}}
    assert tree_lib.flat_names(tree) == {"layers/0/q/kernel": 1, "layers/1/q/kernel": 2, "layers/2/q/kernel": 4,
                                         "head": 3}
    assert tree_lib.flatten(5) == {(): 5}


def test_integer_keys_are_kept_in_layer_paths_and_matched_as_strings():
    params = {"layers": {i: {"q": {"kernel": jnp.ones((4, 6))}, "k": {"kernel": jnp.ones((4, 6))}} for i in range(3)}}
    adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=2, targets=("layers/[02]/q",)))
    assert [s.path for s in adapted.layers] == [("layers", 0, "q"), ("layers", 2, "q")]
    only = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=2, targets=("q",), layers_to_transform=(1,)))
    assert [s.name for s in only.layers] == ["layers/1/q"]
    assert set(vera_jax.merge(only)["layers"]) == {0, 1, 2}
