"""The image family end to end (tiny ViTs from the shipped config, an image folder written here,
tfds mock cifar100), position interpolation through the runner, the paper's configs and counts,
the offline CLI and the paper's sweep grid."""

import importlib
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_data_images import _write_folder  # the image-folder writer of the data tests

import vera_jax
from configs import vit_common
from experiments import param_count, sweep
from vera_jax.data import images
from vera_jax.models import vit
from vera_jax.tasks import image, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
        "image_size": 8, "patch_size": 4}
CLASSES = {"ant": 4, "bee": 3, "cat": 5}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _write_folder(root, CLASSES, "train", 0)
    _write_folder(root, {"ant": 2, "bee": 2, "cat": 1}, "test", 1)
    return str(root)


def tiny_config(method="vera", data_dir="", dataset="mine"):
    c = vit_common.base_config(dataset, f"method={method}")
    c.model.checkpoint, c.model.random_init, c.model.overrides = "vit-base-patch16-224-in21k", True, dict(TINY)
    c.data.dir, c.data.k, c.vera.r = data_dir, 2, 4
    c.batch_size, c.eval_batch_size, c.num_epochs = 2, 4, 2.0
    c.checkpoint_async, c.tensorboard, c.progress_bar, c.log_every_steps = False, False, False, 1
    c.data_threads = c.data_prefetch = 1
    return c


@pytest.mark.parametrize("method", ["head", "full", "lora", "vera"])
def test_every_method_trains_on_an_image_folder_with_k_per_class(method, folder, tmp_path, capsys):
    summary = runner.run(image.FAMILY, tiny_config(method, folder), str(tmp_path))
    assert summary["family"] == "image" and summary["method"] == method and summary["steps"] == 6
    assert [(e["eval"], e["epoch"]) for e in summary["evals"]] == [("test", 1.0), ("test", 2.0)]
    assert all(0 <= e["accuracy"] <= 1 for e in summary["evals"]) and summary["best"]["metric"] == "accuracy"
    labels = images.read_folder(folder, "train").labels
    assert np.array_equal(np.bincount(labels[summary["train_indices"]]), [2, 2, 2])
    assert summary["eval_examples"] == 5 and summary["image_size"] == 8 and summary["num_classes"] == 3
    adapter = {"head": 0, "full": 0, "lora": 2 * 8 * (16 + 16), "vera": 2 * (4 + 16)}[method]
    assert summary["adapter_params"] == adapter
    assert json.loads((tmp_path / "summary.json").read_text())["train_indices"] == summary["train_indices"]
    assert "epoch 2 (step 6): test top-1" in capsys.readouterr().out


def test_tfds_mock_cifar100_draws_the_same_k_shot_subset_for_every_method(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(images, "TFDS_SKIP_DECODING", False)  # tfds' mock serves decoded arrays
    config = tiny_config("vera", dataset="cifar100")
    config.data.k, config.batch_size, config.eval_batch_size, config.num_epochs = 1, 50, 250, 1.0
    other = config.copy_and_resolve_references()
    other.method = "head"
    with tfds.testing.mock_data(num_examples=500):
        drawn = image.load_data(other).train_indices
        summary = runner.run(image.FAMILY, config, str(tmp_path))
    assert summary["train_indices"] == drawn.tolist() and len(drawn) == 100
    assert summary["eval_source"] == "tfds cifar100[test]" and summary["eval_examples"] == 500
    assert [e["step"] for e in summary["evals"]] == [2] and summary["num_classes"] == 100


def test_another_image_size_interpolates_the_position_embeddings(folder, tmp_path):
    config = tiny_config("vera", folder)
    config.data.image_size = 12  # the model is built at 8: 2x2 patches -> 3x3
    loaded = runner.load_model(config, num_labels=3)
    adapted = image.adapt_model(config, loaded)
    expected, _ = vit.interpolate_position_embeddings(loaded.params, loaded.hf_config, 12)
    np.testing.assert_array_equal(adapted.params["embeddings"]["position_embeddings"],
                                  expected["embeddings"]["position_embeddings"])
    assert adapted.params["embeddings"]["position_embeddings"].shape == (1, 10, 16)
    config.num_epochs = 1.0
    summary = runner.run(image.FAMILY, config, str(tmp_path))  # the runner calls adapt_model; images are 12x12
    assert summary["image_size"] == 12 and len(summary["evals"]) == 1
    config.data.image_size = 10
    with pytest.raises(runner.ConfigError, match="data.image_size: 10 needs a ViT whose patch_size divides it"):
        runner.build(image.FAMILY, config)


PAPER = {  # Table 11: (head-only head lr, full (body, head), VeRA (adapter, head), LoRA (adapter, head))
    "base": {"cifar100": (4e-3, (4e-5, 4e-3), (2e-2, 4e-3), (4e-3, 4e-3)),
             "food101": (4e-3, (4e-5, 4e-2), (4e-2, 4e-2), (4e-3, 4e-3)),
             "flowers102": (4e-3, (4e-5, 4e-3), (4e-2, 4e-3), (4e-3, 4e-3)),
             "resisc45": (4e-2, (8e-5, 4e-3), (7e-2, 5e-3), (4e-3, 4e-3))},
    "large": {"cifar100": (4e-4, (4e-5, 4e-3), (4e-2, 2e-3), (4e-3, 4e-3)),
              "food101": (4e-3, (4e-5, 4e-3), (4e-2, 2e-3), (4e-3, 4e-3)),
              "flowers102": (4e-3, (4e-5, 8e-3), (4e-2, 2e-3), (4e-3, 4e-3)),
              "resisc45": (4e-3, (8e-5, 4e-3), (7e-2, 3e-3), (4e-3, 4e-4))},
}


@pytest.mark.parametrize("size", ["base", "large"])
@pytest.mark.parametrize("dataset", ["cifar100", "food101", "flowers102", "resisc45"])
def test_configs_carry_the_papers_table_11(size, dataset):
    module = importlib.import_module(f"configs.vit_{size}_{dataset}")
    head, full, vera, lora = PAPER[size][dataset]
    expected = {"head": {"head": head}, "full": {"head": full[1], "full": full[0]},
                "vera": {"head": vera[1], "adapter": vera[0]}, "lora": {"head": lora[1], "adapter": lora[0]}}
    for method, rates in expected.items():
        c = module.get_config(f"method={method},seed=3")
        got = runner.learning_rates(c)
        assert {k: got[k] for k in rates} == rates, method
        assert (c.method, c.seed, c.data.k, c.num_epochs) == (method, 3, 10, 10.0)
        assert (c.optimizer.weight_decay, c.optimizer.schedule) == (0.01, "linear")
        assert c.model.checkpoint == f"google/vit-{size}-patch16-224-in21k"
        assert c.data.dataset == vit_common.TFDS_NAMES[dataset] and c.data.dataset in images.DATASETS
        assert (c.vera.r, tuple(c.vera.targets), c.vera.d_initial, c.lora.r, tuple(c.lora.targets)) == \
            (256, ("query", "value"), 0.1, 8, ("query", "value"))
    c = module.get_config()
    c.method = "lora"  # as --config.method=lora (a sweep) sets it: the head's rate follows
    assert runner.learning_rates(c)["head"] == lora[1]


@pytest.mark.parametrize("size,vera_count,lora_count", [("base", 24_576, 294_912), ("large", 61_440, 786_432)])
def test_adapter_parameter_counts_excluding_the_head(size, vera_count, lora_count):
    params = param_count.abstract_params(f"vit-{size}-patch16-224-in21k")
    for method, count in (("vera", vera_count), ("lora", lora_count)):
        c = importlib.import_module(f"configs.vit_{size}_cifar100").get_config(f"method={method}")
        c.model.head = ()  # the base model has no classifier: count the adapter alone
        adapted = jax.eval_shape(lambda p, c=c: runner.attach(p, c), params)
        assert vera_jax.count_trainable(adapted) == count


def test_cli_offline_with_a_hub_id_fails_within_seconds_with_advice(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "JAX_PLATFORMS": "cpu"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "experiments.vit", "--config", "configs/vit_base_cifar100.py",
                           "--workdir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.time() - start < 60
    err = proc.stderr.strip().splitlines()[-1]
    assert "google/vit-base-patch16-224-in21k" in err and "--config.model.checkpoint=" in err
    assert "--config.data.dir=" in err and "--config.data.tfds_data_dir=" in err


def test_cli_prints_top1_per_epoch_for_the_small_config(folder, tmp_path):
    over = [f"--config.model.overrides.{k}={v}" for k, v in TINY.items()] + [
        f"--config.data.dir={folder}", "--config.data.k=2", "--config.data.image_size=8", "--config.batch_size=2",
        "--config.eval_batch_size=4", "--config.num_epochs=2", "--config.data_threads=1"]
    proc = subprocess.run([sys.executable, "-m", "experiments.vit", "--config", "configs/vit_small_cifar10_jpeg.py:"
                           "method=head", "--workdir", str(tmp_path), *over], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines[:2]] == ["epoch 1 (step 3)", "epoch 2 (step 6)"]
    assert json.loads(lines[-1])["method"] == "head" and (tmp_path / "summary.json").is_file()


def test_paper_sweep_gives_one_command_per_run():
    config = sweep.load_sweep(os.path.join(ROOT, "configs/sweeps/vit_paper.py"))
    lines = sweep.emit(config, "tpu", tpu="vm", zone="z")
    assert len(lines) == 2 * 4 * 4 * 5
    runs = {(r.params["config"], r.params["method"], r.params["seed"]) for r in sweep.expand(config)}
    assert len(runs) == 160 and all(os.path.isfile(os.path.join(ROOT, f)) for f, _, _ in runs)
    assert "--config=configs/vit_large_resisc45.py" in lines[-1] and "--config.method=vera" in lines[-1]
    assert "--config.config" not in "".join(lines)
