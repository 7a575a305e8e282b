"""Stacked (scanned) layers: a kernel with leading layer axes (linen nn.scan over blocks) is
adapted per layer exactly as its unrolled twin, on every path, or refused when nothing says
where its layer axes are (issue 20)."""

from __future__ import annotations

import dataclasses
import zlib
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vera_jax
from vera_jax.adapters import core
from vera_jax.tree import get_path, set_path

L, D = 4, 32


class Block(nn.Module):
    """query, value (D -> D) and a residual; the signature nn.scan wants (carry, x) -> (carry, y)."""

    boxed: bool = False

    @nn.compact
    def __call__(self, x, _=None):
        init = nn.initializers.lecun_normal()
        kinit = nn.with_partitioning(init, ("embed", "mlp")) if self.boxed else init
        h = jnp.tanh(nn.Dense(D, name="query", kernel_init=kinit)(x))
        h = h + nn.Dense(D, name="value", kernel_init=kinit)(x)
        return x + h, None


def scan(block, length, name, **kw):
    """`block` scanned over `length` layers, params stacked on axis 0 (named "layers" when boxed)."""
    meta = {"metadata_params": {nn.PARTITION_NAME: "layers"}} if kw.get("boxed") else {}
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=length,
                   **meta)(name=name, **kw)


class Scanned(nn.Module):
    boxed: bool = False

    @nn.compact
    def __call__(self, x):
        return scan(Block, L, "layers", boxed=self.boxed)(x, None)[0]


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(L):
            x, _ = Block(name=f"layers_{i}")(x)
        return x


class Pair(nn.Module):
    """Two blocks scanned: the inner scan of a scan of scans (groups (2) x layers (2))."""

    @nn.compact
    def __call__(self, x, _=None):
        return scan(Block, 2, "layers")(x, None)[0], None


class Nested(nn.Module):
    @nn.compact
    def __call__(self, x):
        return scan(Pair, 2, "groups")(x, None)[0]


class PairUnrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x, _ = Block(name=f"layers_{i}")(x)
        return x


class NestedUnrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for g in range(2):
            x = PairUnrolled(name=f"groups_{g}")(x)
        return x


def _x(shape=(2, 3, D), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.fixture(scope="module")
def models():
    x = _x()
    scanned = Scanned().init(jax.random.key(0), x)["params"]
    twin = {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], scanned["layers"]) for i in range(L)}
    return scanned, twin


STACKED = {"stacked_axes": {"layers": 1}}


def _close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_unexplained_stacked_kernel_is_refused_naming_path_shape_and_field(models):
    scanned, _ = models
    with pytest.raises(ValueError) as e:
        vera_jax.apply_vera(scanned, vera_jax.VeraConfig(r=8, targets=("query", "value")))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("VeraConfig.stacked_axes: module layers/query has a kernel of shape (4, 32, 32)")
    with pytest.raises(ValueError, match="LoraConfig.stacked_axes: module layers/query"):
        vera_jax.apply_lora(scanned, vera_jax.LoraConfig(r=2))


def test_declared_layer_axis_gives_per_layer_vectors(models):
    scanned, _ = models
    adapted = vera_jax.apply_vera(scanned, vera_jax.VeraConfig(r=8, targets=("query", "value"), **STACKED))
    assert vera_jax.count_trainable(adapted) == 4 * 2 * (8 + 32) == 320
    vec = adapted.adapter["layers"]["query"]
    assert vec["lambda_d"].shape == (L, 8) and vec["lambda_b"].shape == (L, D)
    spec = adapted.layers[0]
    assert (spec.layer_shape, spec.in_features, spec.out_features) == ((L,), D, D)
    lora = vera_jax.apply_lora(scanned, vera_jax.LoraConfig(r=2, **STACKED))
    assert lora.adapter["layers"]["value"]["lora_A"].shape == (L, 2, D)
    assert lora.adapter["layers"]["value"]["lora_B"].shape == (L, D, 2)
    dvora = vera_jax.apply_dvora(scanned, vera_jax.DVoraConfig(r=8, **STACKED))
    assert dvora.adapter["layers"]["query"]["magnitude"].shape == (L, D)


def test_partitioning_metadata_names_the_layer_axis():
    boxed = Scanned(boxed=True).init(jax.random.key(0), _x())["params"]
    adapted = vera_jax.apply_vera(boxed, vera_jax.VeraConfig(r=8))
    assert [s.stack for s in adapted.layers] == [((0, 1),), ((0, 1),)]
    assert vera_jax.count_trainable(adapted) == 320
    # another name for the axis is only a layer axis when the config allows it
    with pytest.raises(ValueError, match="VeraConfig.stacked_axes: module layers/query"):
        vera_jax.apply_vera(boxed, vera_jax.VeraConfig(r=8, layer_axis_names=("blocks",)))


def test_stacking_config_fields_are_validated():
    with pytest.raises(ValueError, match="VeraConfig.stacked_axes: expected an integer >= 1"):
        vera_jax.VeraConfig(stacked_axes={"layers": 0})
    with pytest.raises(ValueError, match="LoraConfig.stacked_axes: expected a mapping"):
        vera_jax.LoraConfig(stacked_axes=3)
    with pytest.raises(ValueError, match="VeraConfig.layer_axis_names"):
        vera_jax.VeraConfig(layer_axis_names=("",))
    config = vera_jax.VeraConfig(stacked_axes={"groups": 1, "layers": 1})
    assert vera_jax.VeraConfig.from_dict(config.to_dict()) == config


def test_too_many_layer_axes_are_refused(models):
    scanned, _ = models
    with pytest.raises(ValueError, match=r"stacked_axes: module layers/query has a kernel of shape \(4, 32, 32\); "
                                         "its 2 layer axes"):
        vera_jax.apply_vera(scanned, vera_jax.VeraConfig(r=8, stacked_axes={"layers": 2}))
    whole = vera_jax.apply_vera(scanned, vera_jax.VeraConfig(r=8, layers_to_transform=[0, 1, 2, 3], **STACKED))
    assert len(whole.layers) == 2 and all(s.mask is None for s in whole.layers)


@pytest.mark.parametrize("method", ["vera", "dvora"])
def test_some_layers_of_a_stack_train_as_the_unrolled_twin_with_the_same_layers(models, method, tmp_path):
    """layers_to_transform=[0, 2] of the 4 layers a scan stacks: every layer holds vectors (the scan
    slices them), those of layers 1 and 3 zero, their delta exactly zero and their gradient exactly
    zero on every path even when nonzero; the count, outputs, gradients, a few AdamW steps and the
    adapter file are the unrolled twin's (which adapts layers 0 and 2 only)."""
    import optax
    from safetensors.numpy import load_file

    scanned, twin = models
    config = _configs()[method].replace(layers_to_transform=[0, 2])
    adapted = vera_jax.attach(scanned, config)
    reference = vera_jax.attach(twin, config)
    assert [s.keep for s in adapted.layers] == [(True, False, True, False)] * 2
    assert vera_jax.count_trainable(adapted) == vera_jax.count_trainable(reference)
    assert core.unstack(adapted).layers == reference.layers
    _close(core.unstack(adapted).adapter, reference.adapter, 0)
    for leaf in jax.tree.leaves(adapted.adapter["layers"]):
        assert not np.any(np.asarray(leaf)[[1, 3]])
    w = scanned["layers"]["query"]["kernel"]
    merged = vera_jax.merge(_perturb(adapted))["layers"]["query"]["kernel"]
    np.testing.assert_array_equal(merged[np.array([1, 3])], w[np.array([1, 3])])

    x = _x()
    perturbed = _perturb(adapted)  # layers 1 and 3 nonzero too: still no delta, no gradient
    for path in ("merged", "factored", "auto"):
        value, grads = _output_and_grads(Scanned(), perturbed, path, x)
        want_value, want_grads = _output_and_grads(Unrolled(), core.unstack(perturbed), path, x)
        np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-5, err_msg=path)
        for leaf in jax.tree.leaves(grads.adapter["layers"]):
            assert not np.any(np.asarray(leaf)[[1, 3]]), path
        tol = 1e-5 * max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads.adapter))  # DVoRA: ~20
        jax.tree.map(lambda a, b, p=path, t=tol: np.testing.assert_allclose(a, b, rtol=1e-5, atol=t, err_msg=p),
                     core.unstack_tree(grads.adapter, perturbed.layers), want_grads.adapter)

    def train(model, adapted, path):
        trainable, frozen = vera_jax.partition(adapted)
        tx = optax.adamw(1e-2, weight_decay=0.1)
        state = tx.init(trainable)

        @jax.jit
        def step(trainable, state):
            updates, state = tx.update(jax.grad(_loss(model, path, x))(trainable, frozen), state, trainable)
            return optax.apply_updates(trainable, updates), state

        for _ in range(3):
            trainable, state = step(trainable, state)
        return vera_jax.combine(trainable, frozen)

    if method != "vera":  # DVoRA's rescale masking is covered by the outputs and gradients above
        return
    for path in ("merged", "factored"):
        trained = train(Scanned(), adapted, path)
        for leaf in jax.tree.leaves(trained.adapter["layers"]):
            assert not np.any(np.asarray(leaf)[[1, 3]]), path
        _close(core.unstack(trained).adapter, train(Unrolled(), reference, path).adapter)
    vera_jax.save_adapter(tmp_path / "scanned", trained)
    vera_jax.save_adapter(tmp_path / "twin", core.unstack(trained))
    files = [load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("scanned", "twin")]
    assert sorted(files[0]) == sorted(files[1]) and not any("layers_1" in k or "layers_3" in k for k in files[0])
    for k, v in files[1].items():
        np.testing.assert_array_equal(files[0][k], v, err_msg=k)
    back = vera_jax.load_adapter(tmp_path / "twin", scanned)
    assert back.layers == trained.layers
    _close(back.adapter, trained.adapter, 0)


def _configs():
    return {
        "vera": vera_jax.VeraConfig(r=8, **STACKED),
        "lora": vera_jax.LoraConfig(r=2, **STACKED),
        "dvora": vera_jax.DVoraConfig(r=8, **STACKED),
    }


def _perturb(adapted, seed=3):
    """Nonzero b / lora_B, so every leaf's gradient is nonzero."""
    leaves, tree = jax.tree.flatten(adapted.adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return adapted.replace(adapter=jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


def _loss(model, path, x, **kw):
    def loss(trainable, frozen):
        y = vera_jax.apply_adapted(model, vera_jax.combine(trainable, frozen), x, path=path, **kw)
        return jnp.sum(jnp.sin(y))
    return loss


def _output_and_grads(model, adapted, path, x, **kw):
    trainable, frozen = vera_jax.partition(adapted)
    loss = _loss(model, path, x, **kw)
    return jax.jit(jax.value_and_grad(loss))(trainable, frozen)


# per-layer A/B (share_projections=False) are covered by the scan of scans and the files test
@pytest.mark.parametrize("method", ["vera", "lora", "dvora"])
def test_scanned_equals_unrolled_on_every_path(models, method):
    scanned, twin = models
    config = _configs()[method]
    adapted = vera_jax.attach(scanned, config)
    reference = vera_jax.attach(twin, config)
    # the twin's attach starts from the same values (LoRA's random A, per-layer A/B included)
    unstacked = core.unstack(adapted)
    assert unstacked.layers == reference.layers
    _close(unstacked.adapter, reference.adapter, 0)
    _close(unstacked.projections, reference.projections, 0)
    adapted = _perturb(adapted)
    twin_adapted = core.unstack(adapted)
    x = _x()
    paths = ("merged", "factored", "auto") if method == "vera" else ("merged", "factored")
    _assert_equals_twin(Scanned(), adapted, Unrolled(), twin_adapted, paths, x)


def _assert_equals_twin(model, adapted, twin_model, twin_adapted, paths, x):
    """On each path: the stacked model's output and adapter gradients equal its unrolled twin's."""
    for path in paths:
        value, grads = _output_and_grads(model, adapted, path, x)
        want_value, want_grads = _output_and_grads(twin_model, twin_adapted, path, x)
        np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-5)
        _close(core.unstack_tree(grads.adapter, adapted.layers), want_grads.adapter)


def test_merged_path_forms_all_deltas_in_one_batched_product(models):
    scanned, _ = models
    adapted = _perturb(vera_jax.apply_vera(scanned, vera_jax.VeraConfig(r=8, **STACKED)))
    jaxpr = str(jax.make_jaxpr(vera_jax.merge)(adapted))
    # one batched dot per stacked target (query, value), none per layer
    assert jaxpr.count("dot_general") == 2
    assert "dimension_numbers=(([2], [1]), ([0], [0]))" in jaxpr


def test_scan_of_scans_equals_its_unrolled_twin():
    x = _x()
    params = Nested().init(jax.random.key(0), x)["params"]
    twin = {f"groups_{g}": {f"layers_{i}": jax.tree.map(lambda a, g=g, i=i: a[g, i], params["groups"]["layers"])
                            for i in range(2)} for g in range(2)}
    config = vera_jax.VeraConfig(r=8, stacked_axes={"groups": 1, "layers": 1}, share_projections=False)
    adapted = _perturb(vera_jax.apply_vera(params, config))
    assert adapted.adapter["groups"]["layers"]["query"]["lambda_b"].shape == (2, 2, D)
    reference = vera_jax.apply_vera(twin, config)
    assert [s.name for s in reference.layers][:3] == ["groups_0/layers_0/query", "groups_0/layers_0/value",
                                                      "groups_0/layers_1/query"]
    unstacked = core.unstack(adapted)
    assert unstacked.layers == reference.layers
    _close(unstacked.base, twin, 0)
    _assert_equals_twin(Nested(), adapted, NestedUnrolled(), unstacked, ("merged", "factored"), x)


def test_adapter_dropout_drops_the_same_inputs_as_the_unrolled_twin(models):
    scanned, _ = models
    config = vera_jax.VeraConfig(r=8, dropout=0.5, projections="per_shape", **STACKED)  # per-shape A/B too
    adapted = _perturb(vera_jax.apply_vera(scanned, config))
    x, rng = _x(), jax.random.key(7)
    got = vera_jax.apply_adapted(Scanned(), adapted, x, path="merged", dropout_rng=rng)
    want = vera_jax.apply_adapted(Unrolled(), core.unstack(adapted), x, path="merged", dropout_rng=rng)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    without = vera_jax.apply_adapted(Scanned(), adapted, x, path="factored")
    assert float(jnp.abs(got - without).max()) > 1e-3  # dropout did act (and differs per layer)


def test_auto_path_counts_every_stacked_layer():
    one = vera_jax.layer_costs(16, D, D, 8, "vera")
    four = vera_jax.layer_costs(16, D, D, 8, "vera", layers=L)
    assert all(four[k] == L * one[k] for k in one)
    assert vera_jax.choose_path(16, D, D, 8, layers=L) == vera_jax.choose_path(16, D, D, 8)


def test_training_a_scanned_model_gives_the_unrolled_twins_adapter(models):
    import optax

    scanned, twin = models
    x = _x()
    target = jnp.cos(x)

    def train(model, adapted, path):
        trainable, frozen = vera_jax.partition(adapted)
        tx = optax.adam(1e-2)
        state = tx.init(trainable)

        @jax.jit
        def step(trainable, state):
            def loss(t):
                y = vera_jax.apply_adapted(model, vera_jax.combine(t, frozen), x, path=path)
                return jnp.mean((y - target) ** 2)
            grads = jax.grad(loss)(trainable)
            updates, state = tx.update(grads, state, trainable)
            return optax.apply_updates(trainable, updates), state

        for _ in range(3):
            trainable, state = step(trainable, state)
        return vera_jax.combine(trainable, frozen)

    config = vera_jax.LoraConfig(r=2, **STACKED)
    for path in ("merged", "factored"):
        got = train(Scanned(), vera_jax.apply_lora(scanned, config), path)
        want = train(Unrolled(), vera_jax.apply_lora(twin, config), path)
        _close(core.unstack(got).adapter, want.adapter)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_stacked_base_is_quantized_per_layer_and_trains_as_the_twin(models, method):
    from vera_jax import quant

    scanned, twin = models
    q_scanned = quant.quantize_params(scanned, method, stacked_axes={"layers": 1}, block_size=32)
    q_twin = quant.quantize_params(twin, method, block_size=32)
    kernel = q_scanned["layers"]["query"]["kernel"]
    assert kernel.shape == (L, D, D) and kernel.layer_shape == (D, D)
    # each layer's slice is that layer quantized on its own: the twin's kernel, array for array
    _close(core.unstack_tree(q_scanned, vera_jax.apply_vera(scanned, vera_jax.VeraConfig(r=8, **STACKED)).layers),
           q_twin, 0)
    np.testing.assert_array_equal(kernel.dequantize()[2], q_twin["layers_2"]["query"]["kernel"].dequantize())
    adapted = _perturb(vera_jax.apply_vera(q_scanned, vera_jax.VeraConfig(r=8, **STACKED)))
    twin_adapted = core.unstack(adapted)
    x = _x()
    with pytest.raises(ValueError, match="quantized kernel"):
        vera_jax.merge(adapted)
    for path in ("factored", "auto"):
        value, grads = _output_and_grads(Scanned(), adapted, path, x)
        want_value, want_grads = _output_and_grads(Unrolled(), twin_adapted, path, x)
        np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-5)
        _close(core.unstack_tree(grads.adapter, adapted.layers), want_grads.adapter)
    with pytest.raises(ValueError, match=r"quantize_params.stacked_axes: module layers/query has a kernel of shape "
                                         r"\(4, 32, 32\); its 2 layer axes leave no \(in, out\) map"):
        quant.quantize_params(scanned, method, stacked_axes={"layers": 2})


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantize_params_reads_the_layer_axis_from_partitioning_metadata(method):
    """Boxed params (a scanned model's init, "layers" axis names) quantize per layer with no
    argument, as stacked_axes would; the result stays boxed, so apply_vera reads the same axis.
    Without metadata or stacked_axes the kernel is refused by the adapters' rule, word for word."""
    from vera_jax import quant

    boxed = Scanned(boxed=True).init(jax.random.key(0), _x())["params"]
    plain = nn.unbox(boxed)
    q = quant.quantize_params(boxed, method, block_size=32)
    assert isinstance(q["layers"]["query"]["kernel"], nn.Partitioned)
    kernel = nn.unbox(q)["layers"]["query"]["kernel"]
    assert kernel.shape == (L, D, D) and kernel.layer_shape == (D, D)
    explicit = quant.quantize_params(plain, method, block_size=32, **STACKED)
    _close(nn.unbox(q), explicit, 0)
    adapted = _perturb(vera_jax.apply_vera(q, vera_jax.VeraConfig(r=8)))
    assert [s.stack for s in adapted.layers] == [((0, 1),), ((0, 1),)]
    reference = _perturb(vera_jax.apply_vera(explicit, vera_jax.VeraConfig(r=8, **STACKED)))
    x = _x()
    np.testing.assert_array_equal(vera_jax.apply_adapted(Scanned(), adapted, x, path="factored"),
                                  vera_jax.apply_adapted(Scanned(), reference, x, path="factored"))
    with pytest.raises(ValueError) as refused:
        quant.quantize_params(plain, method, block_size=32)
    with pytest.raises(ValueError) as adapters_refused:
        vera_jax.apply_vera(plain, vera_jax.VeraConfig(r=8))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("quantize_params.stacked_axes: module layers/query has a kernel "
                                                       "of shape (4, 32, 32) whose axes no rule explains")
    assert message.removeprefix("quantize_params") == str(adapters_refused.value).removeprefix("VeraConfig")


def test_adapter_files_name_layers_per_layer_and_load_across_layouts(models, tmp_path):
    from safetensors.numpy import load_file

    scanned, twin = models
    config = vera_jax.VeraConfig(r=8, share_projections=False, save_projection=True, **STACKED)
    adapted = _perturb(vera_jax.apply_vera(scanned, config))
    vera_jax.save_adapter(tmp_path / "scanned", adapted)
    names = set(load_file(str(tmp_path / "scanned" / "adapter_model.safetensors")))
    assert {"adapter/layers_3/value/lambda_b", "projections/layers_0/query/A"} <= names
    assert not any(n.startswith("adapter/layers/") for n in names)
    # scanned -> unrolled: the twin's adapter, leaf for leaf
    onto_twin = vera_jax.load_adapter(tmp_path / "scanned", twin)
    _close(onto_twin.adapter, vera_jax.unstack(adapted).adapter, 0)
    # unrolled -> scanned (the axis declared at load, or by partitioning metadata), and back again
    vera_jax.save_adapter(tmp_path / "twin", onto_twin.replace(config=config.replace(stacked_axes=())))
    with pytest.raises(vera_jax.AdapterFileError, match="stacked_axes: module layers/query"):
        vera_jax.load_adapter(tmp_path / "twin", scanned)
    back = vera_jax.load_adapter(tmp_path / "twin", scanned, stacked_axes={"layers": 1})
    _close(back.adapter, adapted.adapter, 0)
    _close(back.projections, adapted.projections, 0)
    boxed = Scanned(boxed=True).init(jax.random.key(0), _x())["params"]
    assert vera_jax.load_adapter(tmp_path / "twin", boxed).adapter["layers"]["query"]["lambda_d"].shape == (L, 8)
    x = _x()
    np.testing.assert_allclose(vera_jax.apply_adapted(Scanned(), back, x, path="merged"),
                               vera_jax.apply_adapted(Unrolled(), onto_twin, x, path="merged"), rtol=1e-5, atol=1e-5)


def test_to_lora_and_back_keep_the_layer_axes(models):
    scanned, _ = models
    adapted = _perturb(vera_jax.apply_vera(scanned, vera_jax.VeraConfig(r=8, **STACKED)))
    lora = vera_jax.to_lora(adapted)
    assert lora.adapter["layers"]["query"]["lora_A"].shape == (L, 8, D) and lora.config.stacked_axes == (("layers", 1),)
    _close(vera_jax.merge(lora), vera_jax.merge(adapted))
    back = vera_jax.to_vera(lora, vera_jax.VeraConfig(r=8))
    _close(back.adapter, adapted.adapter)


def test_serving_bank_refuses_stacked_layers_and_takes_their_file_unrolled(models, tmp_path):
    from vera_jax.serving.bank import AdapterRefused, check_servable

    scanned, twin = models
    adapted = _perturb(vera_jax.apply_vera(scanned, vera_jax.VeraConfig(r=8, **STACKED)))
    with pytest.raises(AdapterRefused, match=r"layers \['layers/query', 'layers/value'\] are stacked"):
        check_servable(adapted, "adapter 'a'")
    vera_jax.save_adapter(tmp_path / "a", adapted)
    check_servable(vera_jax.load_adapter(tmp_path / "a", twin), "adapter 'a'")


# a registered method written for one layer (public API only): a trained scalar times a frozen
# random rank-1 update drawn per layer from its path, kept under the layer's path
@dataclasses.dataclass(frozen=True)
class RankOneConfig(vera_jax.MethodConfig):
    method: ClassVar[str] = "test_rank_one"
    targets: tuple = ("query", "value")
    trainable_extra: tuple = ()
    stacked_axes: tuple = (("layers", 1),)


def _rank_one_init(params, config, layers):
    adapter, projections = {}, {}
    for spec in layers:
        ku, kv = jax.random.split(jax.random.fold_in(jax.random.key(0), zlib.crc32(spec.name.encode())))
        set_path(adapter, spec.path, {"scale": jnp.full((1,), 0.02, jnp.float32)})
        set_path(projections, spec.path, {"u": jax.random.normal(ku, (spec.in_features,)),
                                          "v": jax.random.normal(kv, (spec.out_features,))})
    return adapter, projections


def _uv(adapted, spec):
    pair = get_path(adapted.projections, spec.path)
    return pair["u"], pair["v"]


RANK_ONE = vera_jax.Method(
    name="test_rank_one", config_class=RankOneConfig, init=_rank_one_init,
    delta=lambda adapted, spec, vec, dtype: vec["scale"] * jnp.outer(*_uv(adapted, spec)),
    term=lambda adapted, spec, vec, x: vec["scale"] * (x @ _uv(adapted, spec)[0])[..., None] * _uv(adapted, spec)[1],
)


def test_a_registered_method_written_per_layer_runs_on_stacked_layers(models):
    scanned, twin = models
    vera_jax.register_method(RANK_ONE)
    try:
        adapted = vera_jax.attach(scanned, RankOneConfig())
        assert adapted.adapter["layers"]["query"]["scale"].shape == (L, 1)
        assert adapted.projections["layers"]["value"]["u"].shape == (L, D)
        reference = vera_jax.attach(twin, RankOneConfig())
        _close(vera_jax.unstack(adapted).projections, reference.projections, 0)
        x = _x()
        for path in ("merged", "factored"):
            value, grads = _output_and_grads(Scanned(), adapted, path, x)
            want_value, want_grads = _output_and_grads(Unrolled(), reference, path, x)
            np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-5)
            _close(core.unstack_tree(grads.adapter, adapted.layers), want_grads.adapter)
    finally:
        vera_jax.unregister_method(RANK_ONE.name)
