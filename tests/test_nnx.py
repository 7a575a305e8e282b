"""flax.nnx models: layers in an nnx.List (integer path keys); the merged, factored and auto paths,
a quantized base and adapter dropout, equal to each other and to a linen twin; nnx.LinearGeneral
and nnx.Einsum layers; an nnx training loop through `NnxAdapted`; the trainer on every path; and
adapter files reloaded in a fresh process."""

import os
import subprocess
import sys

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vera_jax
from vera_jax import quant
from vera_jax.train import Task, train_and_evaluate
from vera_jax.tree import get_path

sys.path.insert(0, os.path.dirname(__file__))
import _train_tiny as tiny  # noqa: E402

WIDTH, CLASSES, SEQ = 8, 3, 4
CONFIG = vera_jax.VeraConfig(r=4, targets=("q", "v"), seed=0)


class Block(nnx.Module):
    """Single-head attention with q, k, v as nnx.Linear, then a LayerNorm."""

    def __init__(self, width: int, rngs: nnx.Rngs):
        self.q = nnx.Linear(width, width, rngs=rngs)
        self.k = nnx.Linear(width, width, rngs=rngs)
        self.v = nnx.Linear(width, width, rngs=rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)

    def __call__(self, x):
        scores = self.q(x) @ self.k(x).swapaxes(-1, -2) / np.sqrt(x.shape[-1])
        return self.norm(x + jax.nn.softmax(scores, -1) @ self.v(x))


class Stack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, depth: int = 2):
        self.layers = nnx.List([Block(WIDTH, rngs) for _ in range(depth)])
        self.classifier = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        for block in self.layers:
            x = block(x)
        return self.classifier(x.mean(-2))


def make_model() -> Stack:
    return Stack(nnx.Rngs(0))


def inputs(n: int = 6, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, SEQ, WIDTH)).astype(np.float32)


def _perturb(adapted):
    leaves, treedef = jax.tree.flatten(adapted.adapter)
    return adapted.replace(adapter=treedef.unflatten([x + 0.3 for x in leaves]))


def test_paths_keep_nnx_list_integer_keys():
    model = make_model()
    adapted = vera_jax.apply_vera(model, CONFIG)
    assert [s.path for s in adapted.layers] == [("layers", 0, "q"), ("layers", 0, "v"),
                                                ("layers", 1, "q"), ("layers", 1, "v")]
    assert [s.name for s in adapted.layers] == ["layers/0/q", "layers/0/v", "layers/1/q", "layers/1/v"]
    assert set(adapted.adapter["layers"]) == {0, 1}
    assert adapted.source == "nnx"
    only_second = vera_jax.apply_vera(nnx.state(model, nnx.Param), CONFIG.replace(layers_to_transform=(1,)))
    assert [s.name for s in only_second.layers] == ["layers/1/q", "layers/1/v"]


def test_fresh_adapter_changes_nothing_and_merged_params_fit_nnx_merge_and_update():
    model = make_model()
    x = inputs()
    expected = np.asarray(model(x))
    adapted = vera_jax.apply_vera(model, CONFIG)
    np.testing.assert_array_equal(np.asarray(vera_jax.nnx_merge(model, adapted)(x)), expected)

    trained = _perturb(adapted)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    merged = vera_jax.merge(trained)
    out = np.asarray(nnx.merge(graphdef, merged, rest)(x))
    assert not np.allclose(out, expected)
    np.testing.assert_array_equal(np.asarray(vera_jax.nnx_merge(model, trained)(x)), out)
    np.testing.assert_array_equal(np.asarray(model(x)), expected)  # nnx_merge leaves the model alone
    nnx.update(model, merged)
    np.testing.assert_array_equal(np.asarray(model(x)), out)


def test_nnx_merge_names_a_linen_adapter():
    model = make_model()
    linen_params = nnx.state(model, nnx.Param).to_pure_dict()
    with pytest.raises(ValueError, match="adapted: attached to linen params"):
        vera_jax.nnx_merge(model, vera_jax.apply_vera(linen_params, CONFIG))


def test_lora_head_and_full_accept_nnx_models_and_their_files_round_trip(tmp_path):
    model = make_model()
    lora = vera_jax.apply_lora(model, vera_jax.LoraConfig(r=2, targets=("q", "v")))
    np.testing.assert_array_equal(np.asarray(vera_jax.nnx_merge(model, lora)(inputs())), np.asarray(model(inputs())))
    head = vera_jax.apply_head(model)
    assert vera_jax.count_trainable(head) == WIDTH * CLASSES + CLASSES
    full = vera_jax.apply_full(model)
    assert vera_jax.count_trainable(full) == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    for name, adapted in {"lora": _perturb(lora),
                          "full": full.replace(base=jax.tree.map(lambda x: x + 1, full.base))}.items():
        loaded = vera_jax.load_adapter(vera_jax.save_adapter(tmp_path / name, adapted), model)
        assert loaded.source == "nnx"
        jax.tree.map(np.testing.assert_array_equal, loaded, adapted)


def _examples(n: int, seed: int) -> list[dict]:
    x = inputs(n, seed)
    y = (x.mean(1)[:, :CLASSES] * np.arange(1, CLASSES + 1)).argmax(-1).astype(np.int32)
    return [{"x": x[i], "label": y[i]} for i in range(n)]


def _task(model: Stack, adapted=None) -> Task:
    """The trainer's loss_fn gets plain params (merged, or the base on the factored path);
    nnx.merge rebuilds the model from them."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def logits(params, x):
        return nnx.merge(graphdef, params, rest)(x)

    def loss_fn(params, batch, rng):
        out = logits(params, batch["x"])
        loss = optax.softmax_cross_entropy_with_integer_labels(out, batch["label"]).mean()
        return loss, {"accuracy": (out.argmax(-1) == batch["label"]).mean()}

    return Task(
        adapted=adapted or vera_jax.apply_vera(model, CONFIG), loss_fn=loss_fn,
        train_data=grain.MapDataset.source(_examples(32, 1)), eval_data=grain.MapDataset.source(_examples(8, 2)),
        eval_fn=lambda params, batch: {"pred": logits(params, batch["x"]).argmax(-1), "label": batch["label"]},
        metrics_fn=lambda out: {"accuracy": float((out["pred"] == out["label"]).mean())}, name="nnx_tiny")


def test_trainer_moves_only_vectors_and_adapter_file_reproduces_outputs_in_fresh_process(tmp_path):
    model = make_model()
    task = _task(model)
    config = tiny.override(tiny.tiny_config(4), {"adapter_path": "merged", "optimizer.learning_rate": 5e-2})
    trained = train_and_evaluate(config, str(tmp_path / "run"), task).adapted

    before, after = jax.device_get(task.adapted), jax.device_get(trained)
    jax.tree.map(np.testing.assert_array_equal, before.base, after.base)
    jax.tree.map(np.testing.assert_array_equal, before.projections, after.projections)
    for spec in trained.layers:
        for name in ("lambda_d", "lambda_b"):
            old, new = get_path(before.adapter, spec.path)[name], get_path(after.adapter, spec.path)[name]
            assert not np.array_equal(old, new), f"{spec.name}/{name} did not train"

    expected = np.asarray(vera_jax.nnx_merge(model, trained)(inputs()))
    vera_jax.save_adapter(tmp_path / "adapter", trained)
    out = tmp_path / "reloaded.npy"
    code = ("import sys, numpy as np, vera_jax, test_nnx as t; m = t.make_model(); "
            "a = vera_jax.load_adapter(sys.argv[1], m); "
            "np.save(sys.argv[2], np.asarray(vera_jax.nnx_merge(m, a)(t.inputs())))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__),
                                          os.path.dirname(os.path.dirname(os.path.abspath(__file__)))])}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "adapter"), str(out)], env=env, check=True, timeout=300)
    np.testing.assert_array_equal(np.load(out), expected)


# --- every path on nnx, against the merged path and a linen twin ---------------------------------

class LinenBlock(nn.Module):
    """Block's linen twin (nn.Dense q, k, v; nn.LayerNorm): the same math on the same weights."""

    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.Dense(WIDTH, name=n)(x) for n in ("q", "k", "v"))
        scores = q @ k.swapaxes(-1, -2) / np.sqrt(x.shape[-1])
        return nn.LayerNorm(name="norm")(x + jax.nn.softmax(scores, -1) @ v)


class LinenLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = LinenBlock(name=str(i))(x)
        return x


class LinenStack(nn.Module):
    """Stack's linen twin, its blocks named layers/0, layers/1 as the nnx.List's are."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(CLASSES, name="classifier")(LinenLayers(name="layers")(x).mean(-2))


def _linen_params(nnx_params: dict) -> dict:
    """The nnx Stack's pure dict in the linen twin's layout (integer keys as strings)."""
    return {"layers": {str(i): block for i, block in nnx_params["layers"].items()},
            "classifier": nnx_params["classifier"]}


def _trained(adapted, seed: int = 0):
    """Distinct nonzero vectors per layer, the same for any two adapters with the same layer order."""
    rng = np.random.default_rng(seed)
    adapter = jax.tree.map(lambda x: x, adapted.adapter)
    for spec in adapted.layers:
        layer = get_path(adapter, spec.path)
        for name in sorted(layer):
            layer[name] = jnp.asarray(rng.normal(size=np.shape(layer[name])), np.float32)
    return adapted.replace(adapter=adapter)


def _nnx_run(model):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return lambda params, x: nnx.merge(graphdef, params, rest)(x)


def _pair(config=CONFIG):
    """(nnx adapter, its fn) and (linen adapter, its fn) on the same weights, same trained vectors."""
    model = make_model()
    nnx_adapted = _trained(vera_jax.attach(model, config))
    linen_adapted = _trained(vera_jax.attach(_linen_params(nnx_adapted.base), config))
    assert [s.name for s in linen_adapted.layers] == [s.name for s in nnx_adapted.layers]
    linen_run = lambda params, x: LinenStack().apply({"params": params}, x)  # noqa: E731
    return (nnx_adapted, _nnx_run(model)), (linen_adapted, linen_run)


def _outputs(adapted, run, path, x, **kw):
    return np.asarray(jax.jit(lambda a, x: vera_jax.call_adapted(run, a, x, path=path, **kw))(adapted, x))


@pytest.mark.parametrize("config", [CONFIG, vera_jax.DVoraConfig(r=4, targets=("q", "v"), seed=0),
                                    vera_jax.LoraConfig(r=2, targets=("q", "v"))], ids=["vera", "dvora", "lora"])
def test_factored_and_auto_equal_merged_and_the_linen_twin(config):
    (nnx_adapted, nnx_run), (linen_adapted, linen_run) = _pair(config)
    x = inputs()
    expected = _outputs(nnx_adapted, nnx_run, "merged", x)
    assert not np.allclose(expected, make_model()(x), atol=1e-3)  # the adapter does something
    for path in ("factored", "auto"):
        np.testing.assert_allclose(_outputs(nnx_adapted, nnx_run, path, x), expected, atol=1e-5, err_msg=path)
        np.testing.assert_allclose(_outputs(linen_adapted, linen_run, path, x), expected, atol=1e-5, err_msg=path)


def test_gradients_equal_across_paths_and_the_linen_twin():
    (nnx_adapted, nnx_run), (linen_adapted, linen_run) = _pair()
    x = inputs()

    def grads(adapted, run, path):
        def loss(adapter):
            return vera_jax.call_adapted(lambda p, x: (run(p, x) ** 2).sum(), adapted.replace(adapter=adapter), x,
                                         path=path)
        return [np.asarray(g) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(adapted.adapter))]

    expected = grads(linen_adapted, linen_run, "merged")
    for path in ("merged", "factored", "auto"):
        for got, want in zip(grads(nnx_adapted, nnx_run, path), expected, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=path)


def test_adapter_dropout_draws_equal_the_linen_twins():
    (nnx_adapted, nnx_run), (linen_adapted, linen_run) = _pair(CONFIG.replace(dropout=0.5))
    x, rng = inputs(), jax.random.key(3)
    got = _outputs(nnx_adapted, nnx_run, "merged", x, dropout_rng=rng)  # dropout factors every layer
    np.testing.assert_allclose(got, _outputs(linen_adapted, linen_run, "factored", x, dropout_rng=rng), atol=1e-5)
    assert not np.allclose(got, _outputs(nnx_adapted, nnx_run, "factored", x), atol=1e-4)


def _quantized_model() -> Stack:
    """The Stack with its q/k/v kernels in NF4 (the classifier stays float, as QLoRA keeps it)."""
    model = make_model()
    nnx.update(model, quant.quantize_params(nnx.state(model, nnx.Param).to_pure_dict(), "nf4", block_size=8))
    return model


def test_quantized_nnx_base_runs_factored_and_auto_like_its_dequantized_twin():
    model = _quantized_model()
    assert isinstance(model.layers[0].k.kernel.get_value(), quant.QuantizedKernel)
    adapted = _trained(vera_jax.apply_vera(model, CONFIG))
    reference = adapted.replace(base=quant.dequantize_params(adapted.base))
    run, x = _nnx_run(model), inputs()
    expected = _outputs(reference, run, "merged", x)
    for path in ("factored", "auto"):
        np.testing.assert_allclose(_outputs(adapted, run, path, x), expected, atol=1e-5, err_msg=path)

    def grad(adapted, path):
        loss = lambda adapter: vera_jax.call_adapted(  # noqa: E731
            lambda p, x: (run(p, x) ** 2).sum(), adapted.replace(adapter=adapter), x, path=path)
        return jax.tree.leaves(jax.jit(jax.grad(loss))(adapted.adapter))

    for got, want in zip(grad(adapted, "factored"), grad(reference, "merged"), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="quantized kernel"):
        vera_jax.call_adapted(run, adapted, x, path="merged")


class Projections(nnx.Module):
    """nnx.LinearGeneral over (heads, head_dim) and nnx.Einsum with an (embed, heads, head_dim) kernel."""

    def __init__(self, rngs: nnx.Rngs, equation: str = "btd,dnh->btnh"):
        self.proj = nnx.Einsum(equation, (WIDTH, 2, 4), (2, 4), rngs=rngs)
        self.out = nnx.LinearGeneral((2, 4), WIDTH, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.gelu(self.proj(x)))


GENERAL = vera_jax.VeraConfig(r=4, targets=("proj", "out"), kernel_in_axes=(("out", 2), ("proj", 1)), seed=0)


def test_linear_general_and_einsum_layers_on_every_path():
    model = Projections(nnx.Rngs(0))
    adapted = _trained(vera_jax.apply_vera(model, GENERAL))
    assert [(s.in_features, s.out_features) for s in adapted.layers] == [(8, 8), (8, 8)]
    run, x = _nnx_run(model), inputs()
    expected = _outputs(adapted, run, "merged", x)
    for path in ("factored", "auto"):
        np.testing.assert_allclose(_outputs(adapted, run, path, x), expected, atol=1e-5, err_msg=path)


def test_layers_that_do_not_map_onto_in_out_are_refused_by_name():
    model = Projections(nnx.Rngs(0), equation="btd,dnh->bnth")  # output axes reordered
    adapted = vera_jax.apply_vera(model, GENERAL)
    with pytest.raises(ValueError, match=r"layer proj: nnx.Einsum 'btd,dnh->bnth' does not map"):
        vera_jax.call_adapted(_nnx_run(model), adapted, inputs(), path="factored")
    model = Projections(nnx.Rngs(0))
    adapted = vera_jax.apply_vera(model, GENERAL.replace(kernel_in_axes=(("out", 1), ("proj", 1))))
    with pytest.raises(ValueError, match=r"layer out: nnx.LinearGeneral with axis=\(-2, -1\).*kernel_in_axes"):
        vera_jax.call_adapted(_nnx_run(model), adapted, inputs(), path="factored")


def test_layers_not_built_from_the_given_params_are_named():
    model = make_model()
    adapted = vera_jax.apply_vera(model, CONFIG)
    with pytest.raises(ValueError, match=r"never called as a module: \['layers/0/q'.*nnx.merge"):
        jax.jit(lambda a, x: vera_jax.call_adapted(lambda _, x: model(x), a, x, path="factored"))(adapted, inputs())


# --- an nnx training loop of one's own -----------------------------------------------------------

def test_nnx_optimizer_with_the_trainable_filter_moves_only_the_adapter_and_head():
    model = _quantized_model()
    config = CONFIG.replace(trainable_extra=("classifier",), dropout=0.1)
    module = vera_jax.NnxAdapted(model, vera_jax.apply_vera(model, config), path="auto")
    optimizer = nnx.Optimizer(module, optax.adam(1e-2), wrt=module.trainable)
    x, y = inputs(), jnp.arange(6) % CLASSES

    @nnx.jit
    def step(module, optimizer, rng):
        def loss(module):
            return optax.softmax_cross_entropy_with_integer_labels(module(x, dropout_rng=rng), y).mean()
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, module.trainable))(module)
        optimizer.update(module, grads)
        return value

    before = jax.device_get(module.adapted())
    losses = [float(step(module, optimizer, jax.random.key(i))) for i in range(5)]
    after = jax.device_get(module.adapted())
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, before.base["layers"], after.base["layers"])
    jax.tree.map(np.testing.assert_array_equal, before.projections, after.projections)
    for leaf_before, leaf_after in zip(jax.tree.leaves(before.adapter) + jax.tree.leaves(before.base["classifier"]),
                                       jax.tree.leaves(after.adapter) + jax.tree.leaves(after.base["classifier"])):
        assert not np.array_equal(leaf_before, leaf_after)
    np.testing.assert_allclose(np.asarray(module(x, train=False)),
                               _outputs(after, _nnx_run(model), "factored", x), atol=1e-6)
    assert set(nnx.state(module, nnx.LoRAParam).to_pure_dict()) == {"adapter"}


@pytest.mark.parametrize("path,quantized", [("factored", False), ("auto", True)])
def test_trainer_trains_nnx_on_factored_and_auto_with_a_quantized_base(tmp_path, path, quantized):
    model = _quantized_model() if quantized else make_model()
    task = _task(model, vera_jax.apply_vera(model, CONFIG.replace(dropout=0.1)))
    config = tiny.override(tiny.tiny_config(4), {"adapter_path": path, "optimizer.learning_rate": 5e-2})
    trained = train_and_evaluate(config, str(tmp_path / "run"), task).adapted

    before, after = jax.device_get(task.adapted), jax.device_get(trained)
    jax.tree.map(np.testing.assert_array_equal, before.base, after.base)
    for spec in trained.layers:
        for name in ("lambda_d", "lambda_b"):
            old, new = get_path(before.adapter, spec.path)[name], get_path(after.adapter, spec.path)[name]
            assert not np.array_equal(old, new), f"{spec.name}/{name} did not train"
    reference = after.replace(base=quant.dequantize_params(after.base))
    run, x = _nnx_run(model), inputs()
    np.testing.assert_allclose(_outputs(after, run, path, x), _outputs(reference, run, "merged", x), atol=1e-5)


# --- layers stacked by nnx.vmap and run by nnx.scan ----------------------------------------------

class Scanned(nnx.Module):
    """Stack's blocks made by nnx.vmap (every param gains a leading layer axis), run by nnx.scan."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(WIDTH, rngs)

        self.layers = make(rngs)
        self.classifier = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(block, x):
            return block(x)

        return self.classifier(body(self.layers, x).mean(-2))


class Unrolled(nnx.Module):
    """Scanned's unrolled twin: blocks layers_0, layers_1 (the per-layer names of a stacked layer)."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers_0, self.layers_1 = Block(WIDTH, rngs), Block(WIDTH, rngs)
        self.classifier = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.classifier(self.layers_1(self.layers_0(x)).mean(-2))


STACKED = CONFIG.replace(stacked_axes=(("layers", 1),))


def _scanned_pair(quantized: bool = False, config=STACKED):
    """(adapter, fn) of Scanned and of its unrolled twin, same weights and trained vectors."""
    scanned, unrolled = Scanned(nnx.Rngs(0)), Unrolled(nnx.Rngs(1))
    params = nnx.state(scanned, nnx.Param).to_pure_dict()
    if quantized:
        params = quant.quantize_params(params, "nf4", block_size=8, stacked_axes=config.stacked_axes)
        nnx.update(scanned, params)
    nnx.update(unrolled, {"classifier": params["classifier"],
                          **{f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(2)}})
    stacked = _trained(vera_jax.apply_vera(scanned, config))
    twin = vera_jax.apply_vera(unrolled, config.replace(stacked_axes=()))
    adapter = {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], stacked.adapter["layers"]) for i in range(2)}
    assert [s.name for s in stacked.layers] == ["layers/q", "layers/v"]
    assert [s.name for s in twin.layers] == ["layers_0/q", "layers_0/v", "layers_1/q", "layers_1/v"]
    return (stacked, _nnx_run(scanned)), (twin.replace(adapter=adapter), _nnx_run(unrolled)), (scanned, unrolled)


def test_scanned_nnx_layers_equal_their_unrolled_twin_on_every_path_and_share_its_files(tmp_path):
    (stacked, run), (twin, twin_run), (scanned, unrolled) = _scanned_pair()
    x = inputs()
    expected = _outputs(twin, twin_run, "merged", x)
    for path in ("merged", "factored", "auto"):
        np.testing.assert_allclose(_outputs(stacked, run, path, x), expected, atol=1e-5, err_msg=path)

    def grads(adapted, run, path):
        loss = lambda adapter: vera_jax.call_adapted(  # noqa: E731
            lambda p, x: (run(p, x) ** 2).sum(), adapted.replace(adapter=adapter), x, path=path)
        return jax.jit(jax.grad(loss))(adapted.adapter)

    want = grads(twin, twin_run, "merged")
    got = grads(stacked, run, "factored")["layers"]
    for i in range(2):
        jax.tree.map(lambda g, w, i=i: np.testing.assert_allclose(g[i], w, atol=1e-5, rtol=1e-5),
                     got, want[f"layers_{i}"])

    onto_unrolled = vera_jax.load_adapter(vera_jax.save_adapter(tmp_path / "scanned", stacked), unrolled)
    np.testing.assert_allclose(_outputs(onto_unrolled, twin_run, "factored", x), expected, atol=1e-5)
    onto_scanned = vera_jax.load_adapter(vera_jax.save_adapter(tmp_path / "unrolled", twin), scanned,
                                         stacked_axes={"layers": 1})
    np.testing.assert_allclose(_outputs(onto_scanned, run, "factored", x), expected, atol=1e-5)


def test_scanned_nnx_dropout_and_quantized_base_equal_the_unrolled_twin():
    (stacked, run), (twin, twin_run), _ = _scanned_pair(quantized=True, config=STACKED.replace(dropout=0.5))
    x, rng = inputs(), jax.random.key(5)
    assert isinstance(get_path(stacked.base, ("layers", "q", "kernel")), quant.QuantizedKernel)
    np.testing.assert_allclose(_outputs(stacked, run, "auto", x, dropout_rng=rng),
                               _outputs(twin, twin_run, "factored", x, dropout_rng=rng), atol=1e-5)


def test_scanned_nnx_layers_with_some_of_them_adapted_equal_the_twin():
    """layers_to_transform=[1] of the 2 layers nnx.vmap stacks: layer 0's vectors (nonzero here) are
    masked on every path (the mask rides in the Carried kernel through nnx.scan), so the outputs are
    the unrolled twin's that adapts layer 1 only."""
    scanned, unrolled = Scanned(nnx.Rngs(0)), Unrolled(nnx.Rngs(1))
    params = nnx.state(scanned, nnx.Param).to_pure_dict()
    nnx.update(unrolled, {"classifier": params["classifier"],
                          **{f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(2)}})
    config = STACKED.replace(layers_to_transform=[1])
    stacked = vera_jax.apply_vera(scanned, config)
    assert [s.keep for s in stacked.layers] == [(False, True)] * 2
    stacked = stacked.replace(adapter=jax.tree.map(lambda x: x + 0.3, stacked.adapter))
    twin = vera_jax.apply_vera(unrolled, config.replace(stacked_axes=()))
    assert [s.name for s in twin.layers] == ["layers_1/q", "layers_1/v"]
    twin = twin.replace(adapter={"layers_1": jax.tree.map(lambda a: a[1], stacked.adapter["layers"])})
    x = inputs()
    expected = _outputs(twin, _nnx_run(unrolled), "merged", x)
    assert not np.allclose(expected, _outputs(twin.replace(adapter=jax.tree.map(jnp.zeros_like, twin.adapter)),
                                              _nnx_run(unrolled), "merged", x), atol=1e-4)
    for path in ("merged", "factored", "auto"):
        np.testing.assert_allclose(_outputs(stacked, _nnx_run(scanned), path, x), expected, atol=1e-5, err_msg=path)
