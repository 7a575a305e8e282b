"""flax.nnx models: layers in an nnx.List (integer path keys), the merged path, the trainer, and
adapter files reloaded in a fresh process."""

import os
import subprocess
import sys

import grain
import jax
import numpy as np
import optax
import pytest
from flax import nnx

import vera_jax
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


@pytest.mark.parametrize("path", ["factored", "auto"])
def test_factored_and_auto_paths_refuse_nnx_and_point_to_merged(path):
    model = make_model()
    adapted = vera_jax.apply_vera(model, CONFIG)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    run = lambda params, x: nnx.merge(graphdef, params, rest)(x)  # noqa: E731
    with pytest.raises(ValueError, match=r"nnx.*path='merged'"):
        vera_jax.call_adapted(run, adapted, inputs(), path=path)
    np.testing.assert_array_equal(np.asarray(vera_jax.call_adapted(run, adapted, inputs(), path="merged")),
                                  np.asarray(model(inputs())))


def test_adapter_dropout_is_refused_for_nnx_even_on_the_merged_path():
    adapted = vera_jax.apply_vera(make_model(), CONFIG.replace(dropout=0.1))
    with pytest.raises(ValueError, match="adapter dropout.*dropout=0"):
        vera_jax.call_adapted(lambda params, x: x, adapted, inputs(), path="merged", dropout_rng=jax.random.key(0))


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


def _task(model: Stack) -> Task:
    """The trainer's loss_fn gets plain merged params; nnx.merge rebuilds the model from them."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def logits(params, x):
        return nnx.merge(graphdef, params, rest)(x)

    def loss_fn(params, batch, rng):
        out = logits(params, batch["x"])
        loss = optax.softmax_cross_entropy_with_integer_labels(out, batch["label"]).mean()
        return loss, {"accuracy": (out.argmax(-1) == batch["label"]).mean()}

    return Task(
        adapted=vera_jax.apply_vera(model, CONFIG), loss_fn=loss_fn,
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
