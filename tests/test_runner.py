"""The family layer: a toy family of ~50 lines (data, collate, loss, one metric) runs end to end
through the generic runner, with two named evals on their own schedules."""

from __future__ import annotations

import dataclasses
import json
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vera_jax import DVoraConfig, LoraConfig, VeraConfig
from vera_jax.tasks import runner
from vera_jax.train import Eval, default_config

# ---- the toy family: does token 7 occur in the sequence? (the part a new family writes) ----
PAD, NEEDLE = 0, 7


def toy_load_data(config) -> dict:
    rng = np.random.default_rng(config.data.seed)

    def split(n):
        seqs = [rng.integers(1, 12, rng.integers(3, 15)).astype(np.int32) for _ in range(n)]
        return [{"ids": s, "label": np.int32(NEEDLE in s)} for s in seqs]

    return {"train": split(config.data.train), "dev": split(24), "test": split(16)}


def toy_collate(rows, longest):
    ids = np.full((len(rows), longest), PAD, np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row["ids"])] = row["ids"]
    return {"ids": ids, "label": np.stack([row["label"] for row in rows])}


def toy_make_parts(config, model, data) -> runner.Parts:
    def logits(params, batch, deterministic, rng=None):
        ids = batch["ids"]
        return model.module.apply({"params": params}, ids, (ids != PAD).astype(jnp.int32), jnp.zeros_like(ids),
                                  deterministic=deterministic, rngs=None if rng is None else {"dropout": rng})

    def loss_fn(params, batch, rng):
        out = logits(params, batch, False, rng)
        return optax.softmax_cross_entropy_with_integer_labels(out, batch["label"]).mean(), {}

    def eval_fn(params, batch):
        return {"hit": logits(params, batch, True).argmax(-1) == batch["label"]}

    def accuracy(out):
        return {"accuracy": float(out["hit"].mean())}

    def evaluation(rows, every):
        return Eval(grain.MapDataset.source(rows), eval_fn, accuracy, every=every,
                    lengths=[len(r["ids"]) for r in rows])

    return runner.Parts(train=grain.MapDataset.source(data["train"]), loss_fn=loss_fn, collate=toy_collate,
                        train_lengths=[len(r["ids"]) for r in data["train"]], sort_window=2,
                        evals={"dev": evaluation(data["dev"], "epoch"), "test": evaluation(data["test"], "end")},
                        best_metric="dev/accuracy", info={"train_examples": len(data["train"])})


TOY = runner.Family(name="toy", load_data=toy_load_data, make_parts=toy_make_parts,
                    model_options=lambda config, data: {"num_labels": 2})
# ---- end of the toy family ----


@pytest.fixture(scope="module")
def bert_config_dir(tmp_path_factory):
    """A checkpoint directory with only a config.json: the model is drawn from the seed."""
    root = tmp_path_factory.mktemp("toybert")
    (root / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 12, "hidden_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 16,
        "type_vocab_size": 1, "pad_token_id": 0, "hidden_act": "gelu"}))
    return str(root)


def toy_config(checkpoint: str, method: str = "vera") -> ml_collections.ConfigDict:
    c = default_config()
    c.method, c.network_timeout, c.save_adapter = method, 1.0, True
    c.model = runner.model_config()
    c.model.checkpoint, c.model.random_init, c.model.head = checkpoint, True, ("pooler", "classifier")
    c.data = ml_collections.ConfigDict({"seed": 0, "train": 32})
    c.vera = runner.method_config(VeraConfig, r=4, targets=("query", "value"))
    c.lora = runner.method_config(LoraConfig, r=2, alpha=2.0)
    c.dvora = runner.method_config(DVoraConfig, r=4, targets=("query", "value"))
    c.lr = ml_collections.ConfigDict({"vera": 1e-2, "lora": 1e-3, "dvora": 1e-2, "head": 1e-2, "full": 1e-4})
    c.batch_size, c.eval_batch_size, c.num_epochs = 8, 8, 2.0
    c.checkpoint_async, c.tensorboard, c.progress_bar, c.log_every_steps = False, False, False, 2
    c.data_threads = c.data_prefetch = 1
    return c


@pytest.mark.parametrize("method", ["vera", "lora", "dvora"])
def test_toy_family_runs_end_to_end_through_the_runner(method, bert_config_dir, tmp_path):
    summary = runner.run(TOY, toy_config(bert_config_dir, method), str(tmp_path))
    assert summary["family"] == "toy" and summary["method"] == method and summary["steps"] == 8
    assert [(e["eval"], e["step"]) for e in summary["evals"]] == [("dev", 4), ("dev", 8), ("test", 8)]
    dev = [e["accuracy"] for e in summary["evals"] if e["eval"] == "dev"]
    assert summary["best"]["eval"] == "dev" and summary["best"]["value"] == max(dev)
    assert summary["final"]["evals"]["test"]["accuracy"] == summary["evals"][-1]["accuracy"]
    per_layer = {"vera": 4 + 16, "lora": 2 * 16 + 16 * 2, "dvora": 4 + 16 + 16}[method]  # dvora: d, b, m
    assert summary["adapter_params"] == 2 * 2 * per_layer
    assert json.loads((tmp_path / "summary.json").read_text())["evals"] == summary["evals"]
    assert os.path.exists(tmp_path / "adapter" / "adapter_config.json")
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("dev/accuracy" in ln for ln in lines) and any("test/accuracy" in ln for ln in lines)


def test_random_init_is_drawn_from_the_seed(bert_config_dir):
    a = runner.load_model(toy_config(bert_config_dir))
    config = toy_config(bert_config_dir)
    config.seed = 1
    b = runner.load_model(config)
    leaves = lambda m: jax.tree.leaves({k: v for k, v in m.params.items() if k != "classifier"})  # noqa: E731
    assert not all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
    assert a.hf_config["architectures"] == ["BertModel"] and a.tokenizer is None
    config.model.checkpoint = "vit-base-patch16-224-in21k"  # a config shipped with vera_jax: no files
    config.model.overrides = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                              "intermediate_size": 32, "image_size": 8, "patch_size": 4}
    vit = runner.load_model(config, num_labels=3)
    assert vit.params["classifier"]["kernel"].shape == (16, 3) and vit.hf_config["num_hidden_layers"] == 1


def test_runner_errors_name_the_field(bert_config_dir, tmp_path):
    config = toy_config(bert_config_dir)
    config.model.random_init = False
    config.model.overrides = {"num_hidden_layers": 1}
    with pytest.raises(runner.ConfigError, match="model.overrides: only with model.random_init"):
        runner.build(TOY, config)
    config = toy_config(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="model.checkpoint: .*missing is not a checkpoint"):
        runner.build(TOY, config)
    config = toy_config(bert_config_dir)
    config.best_metric = "valid/accuracy"
    with pytest.raises(ValueError, match="best_metric: 'valid/accuracy' names eval 'valid'; the evals are"):
        runner.run(TOY, config, str(tmp_path / "run"))
    with pytest.raises(runner.ConfigError, match=r"vera: unknown fields \['rank'\]"):
        runner.method_config(VeraConfig, rank=4)


def test_family_adapt_model_and_per_method_learning_rates(bert_config_dir):
    """Family.adapt_model sees the loaded model before the adapter attaches; an lr entry may be a
    {method: rate} dict that config.method picks from."""
    seen = []

    def adapt(config, model):
        seen.append(model.hf_config["num_hidden_layers"])
        return dataclasses.replace(model, params={**model.params, "classifier": jax.tree.map(np.zeros_like,
                                                                                            model.params["classifier"])})

    family = dataclasses.replace(TOY, adapt_model=adapt)
    config = toy_config(bert_config_dir, "lora")
    config.lr = ml_collections.ConfigDict({"head": {"vera": 1e-2, "lora": 3e-3}, "lora": 1e-3, "full": 1e-4})
    task, _, resolved = runner.build(family, config)
    assert seen == [2] and not np.any(task.adapted.base["classifier"]["kernel"])
    assert (resolved.optimizer.learning_rates.head, resolved.optimizer.learning_rates.adapter) == (3e-3, 1e-3)
    config.method = "head"
    with pytest.raises(runner.ConfigError, match=r"lr.head: no rate for method 'head'; it has \['lora', 'vera'\]"):
        runner.learning_rates(config)
