"""The E2E NLG family end to end, offline: a tiny GPT-2 drawn from a config.json beside a
byte-level BPE tokenizer the test trains, E2E CSVs the test writes, every method through the
runner and the CLI, the continuation-only smoothed loss, the paper's configs, and offline advice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import e2e_common, gpt2_large_e2e, gpt2_medium_e2e
from vera_jax.tasks import causal_lm, e2e, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES, FOODS = ["The Eagle", "Zizzi", "Aromi", "The Mill"], ["French", "Italian", "Chinese"]


def pairs(rng, n):
    rows = []
    for _ in range(n):
        name, food = rng.choice(NAMES), rng.choice(FOODS)
        mr = f"name[{name}], food[{food}]"
        rows.append((mr, f"{name} serves {food} food."))
    return rows


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(0)
    for name, n in (("trainset.csv", 24), ("devset.csv", 10), ("testset_w_refs.csv", 10)):
        lines = ["mr,ref"] + [f'"{mr}","{ref}"' for mr, ref in pairs(rng, n)]
        (root / name).write_text("\n".join(lines) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, e2e_dir):
    """config.json of a 2-layer GPT-2 and a byte-level BPE tokenizer trained on the E2E texts."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("gpt2")
    texts = [line for name in os.listdir(e2e_dir) for line in open(os.path.join(e2e_dir, name))]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    tok.save_pretrained(root)
    (root / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": len(tok), "n_positions": 128,
        "n_embd": 32, "n_layer": 2, "n_head": 2, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.eos_token_id}))
    return str(root)


def tiny_config(checkpoint, data_dir, method="vera", **fields):
    c = e2e_common.base_config(f"method={method}")
    c.model.checkpoint, c.model.random_init = checkpoint, True
    c.data.dir, c.data.max_length, c.data.buckets, c.data.eval_limit = data_dir, 32, (16,), 6
    c.decode.num_beams, c.decode.max_new_tokens = 2, 6
    c.vera.r, c.lora.r = 8, 2
    c.batch_size, c.eval_batch_size, c.num_epochs, c.optimizer.warmup_steps = 8, 4, 1.0, 1
    c.checkpoint_async, c.tensorboard, c.progress_bar, c.log_every_steps = False, False, False, 1
    c.data_threads = c.data_prefetch = 1
    for key, value in fields.items():
        c[key] = value
    return c


@pytest.mark.parametrize("method", ["vera", "lora", "full"])
def test_every_method_trains_decodes_and_scores(method, gpt2_dir, e2e_dir, tmp_path):
    summary = runner.run(e2e.FAMILY, tiny_config(gpt2_dir, e2e_dir, method), str(tmp_path))
    assert summary["steps"] == 3 and summary["train_pairs"] == 24 and summary["eval_mrs"] == 6
    (final,) = summary["evals"]
    assert final["eval"] == "test" and final["step"] == 3
    assert set(final) >= {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    out = tmp_path / "predictions" / "step_3"
    predictions = (out / "predictions.txt").read_text().splitlines()
    refs = json.loads((out / "references.json").read_text())
    assert (len(predictions) == len(refs["mrs"]) == 6
            and json.loads((out / "metrics.json").read_text())["BLEU"] == final["BLEU"])
    assert refs["mrs"][0].startswith("name[") and all("\n" not in p for p in predictions)


def test_a_gemma3_trains_and_decodes_through_the_runner(gpt2_dir, e2e_dir, tmp_path):
    """A tiny Gemma 3 (a sliding layer of 8 slots, shorter than the 32-slot rows, and a global one) on
    the same tokenizer: VeRA trains on query/value and the beam decoder runs on the cached layers."""
    import shutil

    root = tmp_path / "gemma3"
    shutil.copytree(gpt2_dir, root)
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": config["vocab_size"],
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"], "eos_token_id": config["eos_token_id"],
        "bos_token_id": config["bos_token_id"]}))
    summary = runner.run(e2e.FAMILY, tiny_config(str(root), e2e_dir), str(tmp_path / "run"))
    assert summary["steps"] == 3 and summary["evals"][0]["step"] == 3
    assert len((tmp_path / "run" / "predictions" / "step_3" / "predictions.txt").read_text().splitlines()) == 6


def test_steps_zero_scores_the_untuned_model(gpt2_dir, e2e_dir, tmp_path):
    summary = runner.run(e2e.FAMILY, tiny_config(gpt2_dir, e2e_dir, num_train_steps=0), str(tmp_path))
    assert summary["steps"] == 0 and [e["step"] for e in summary["evals"]] == [0]
    assert (tmp_path / "predictions" / "step_0" / "predictions.txt").exists()


def test_loss_covers_only_the_continuation_with_label_smoothing(gpt2_dir, e2e_dir):
    task, info, config = runner.build(e2e.FAMILY, tiny_config(gpt2_dir, e2e_dir))
    row = task.train_data[0]
    n, ctx = len(row["ids"]), int(row["prompt"])
    batch = task.collate([row], n)
    width = batch["ids"].shape[1]
    assert width == (16 if n <= 16 else 32) and batch["ids"][0, ctx - 1] == row["ids"][ctx - 1]
    assert batch["weights"][0].tolist() == [0] * ctx + [1] * (n - ctx) + [0] * (width - n)
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    targets, weights = jnp.array([[1, 2, 3, 4, 5], [6, 0, 1, 2, 3]]), jnp.array([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
    smoothed = optax.smooth_labels(jax.nn.one_hot(targets, 7), 0.1)
    expected = (optax.softmax_cross_entropy(logits, smoothed) * weights).sum() / weights.sum()
    np.testing.assert_allclose(causal_lm.lm_loss(logits, targets, weights, 0.1), expected, rtol=1e-6)


def test_prompts_are_left_padded_and_end_in_the_separator(gpt2_dir, e2e_dir):
    task, _, _ = runner.build(e2e.FAMILY, tiny_config(gpt2_dir, e2e_dir))
    ev = task.evals["test"]
    batch = ev.collate([ev.data[0], ev.data[5]], 16)
    assert batch["mask"][:, -1].tolist() == [1, 1] and batch["mask"][0, 0] == 0
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(gpt2_dir).eos_token_id
    assert batch["ids"][:, -1].tolist() == [eos, eos]


def test_configs_carry_the_paper_settings():
    for module, vera_lr in ((gpt2_medium_e2e, 1e-1), (gpt2_large_e2e, 2e-2)):
        c = module.get_config()
        assert (c.method, c.vera.r, tuple(c.vera.targets), c.vera.d_initial, c.lr.vera) == \
            ("vera", 1024, ("query", "value"), 0.1, vera_lr)
        assert (c.batch_size, c.num_epochs, c.optimizer.warmup_steps, c.optimizer.weight_decay,
                c.optimizer.schedule, c.label_smoothing) == (8, 5.0, 500, 0.01, "linear", 0.1)
        assert (c.decode.num_beams, c.decode.length_penalty, c.decode.no_repeat_ngram_size,
                c.decode.max_new_tokens) == (10, 0.8, 4, 64)
        lora = module.get_config("method=lora,seed=2")
        assert (lora.method, lora.seed, lora.lora.r, lora.lora.alpha, lora.lora.dropout, lora.lr.lora) == \
            ("lora", 2, 4, 32.0, 0.1, 2e-4)
    from vera_jax.tasks import runner

    assert runner.runnable_methods(gpt2_medium_e2e.get_config()) == ["full", "lora", "vera"]  # no head to train
    with pytest.raises(runner.ConfigError, match=r"method: 'head' needs modules to train in model.head, which is "
                                                 r"empty; this config runs \['full', 'lora', 'vera'\]"):
        runner._validate(gpt2_medium_e2e.get_config("method=head"))
    with pytest.raises(runner.ConfigError, match=r"method: expected one of \['full', 'lora', 'vera'\], got 'dora'"):
        runner._validate(gpt2_medium_e2e.get_config("method=dora"))
    with pytest.raises(runner.ConfigError, match=r"method: 'dvora' needs a section config.dvora \(the DVoraConfig"):
        runner._validate(gpt2_medium_e2e.get_config("method=dvora"))


def test_offline_training_exits_within_seconds_saying_what_to_do(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "experiments.e2e", "--config", "configs/gpt2_medium_e2e.py",
                           "--workdir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--config.model.checkpoint=" in proc.stderr and "--config.data.dir=" in proc.stderr
    assert time.time() - start < 60


def test_a_tokenizer_that_adds_bos_gets_it_before_every_mr(gpt2_dir, e2e_dir, tmp_path):
    """Gemma's tokenizer puts <bos> first and Gemma never saw text without it; GPT-2's adds nothing."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(gpt2_dir)
    assert causal_lm.leading_special_tokens(plain) == []
    with_bos = tmp_path / "with_bos"
    shutil.copytree(gpt2_dir, with_bos)
    bos = plain.eos_token_id
    plain._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                         special_tokens=[("<|endoftext|>", bos)])
    plain.save_pretrained(with_bos)
    assert causal_lm.leading_special_tokens(AutoTokenizer.from_pretrained(with_bos)) == [bos]
    task, _, _ = runner.build(e2e.FAMILY, tiny_config(str(with_bos), e2e_dir))
    first = [int(row["ids"][0]) for row in task.train_data]
    assert first == [bos] * len(first)
    ev = task.evals["test"]
    batch = ev.collate([ev.data[0]], 16)
    start = int(np.argmax(batch["mask"][0]))
    assert batch["ids"][0, start] == bos and batch["ids"][0, start + 1] != bos
