"""The math family (HF PEFT's MetaMathQA -> GSM8K method comparison): answer parsing on every
GSM8K reference and on tricky generations, agreement with PEFT's own functions (the fixture
tests/fixtures/peft_metamath.json, written by running them: see its generator), the configs, the
offline advice, and a tiny LLaMA end to end through `python -m experiments.math`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import llama32_3b_metamathqa, math_common, smollm2_gsm8k
from vera_jax.data import DataUnavailableError, metamath
from vera_jax.metrics import gsm8k
from vera_jax.tasks import causal_lm
from vera_jax.tasks import math as math_family
from vera_jax.train import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(ROOT, "..", "shared", "data", "gsm8k")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "peft_metamath.json")
needs_gsm8k = pytest.mark.skipif(not os.path.isfile(os.path.join(GSM8K, "test.jsonl")),
                                 reason="../shared/data/gsm8k is not here")


@pytest.fixture(scope="module")
def peft():
    with open(FIXTURE) as f:
        return json.load(f)


@needs_gsm8k
def test_every_gsm8k_reference_answer_is_extracted():
    splits = metamath.load_gsm8k(GSM8K)
    assert (len(splits["train"]), len(splits["test"])) == (7473, 1319)
    commas, peft_misread = 0, []
    for name, split in splits.items():
        for i, r in enumerate(split.records):
            final = r["response"].rsplit("\n", 1)[1]
            assert final.startswith("#### ")
            n = final[len("#### "):]
            assert gsm8k.reference_answer(r["response"], lenient=True) == n
            value = gsm8k.answer_value(n, thousands=True)
            assert value == Decimal(n.replace(",", ""))
            assert gsm8k.is_correct(f"Answer: steps.\nThe answer is: {value}", r["response"], lenient=True)
            if gsm8k.parse_answer(r["response"]) != n:
                peft_misread.append((name, i))
            else:
                assert gsm8k.is_correct(r["response"], r["response"])
            commas += "," in n
    assert commas == 14 + 79  # references PEFT can only match as strings
    # PEFT's parser takes "The answer is <<8=8>>8." over "#### 8" in two train rows, neither a validation row
    assert peft_misread == [("train", 1297), ("train", 5415)]
    assert not set(metamath.valid_indices(7473).tolist()) & {1297, 5415}


@pytest.mark.parametrize("text, answer, value", [
    ("He pays 2 * 9 = $18.\nThe answer is: $18", "18", 18),  # dollar sign
    ("The answer is: 1,600", "1,600", 1600),  # thousands separator
    ("The answer is: 50%.", "50", 50),  # percent, trailing period
    ("The answer is: 18\n\nQuestion: Tom has 3. The answer is 4", "18", 18),  # PEFT's first delimiter wins
    ("The answer is: 7\nThe answer is: 18 dollars\n", "18 dollars", None),  # ... at its last occurrence
    ("The answer is: 18\nHope that helps!", "18", 18),  # trailing text on the next line
    ("The final answer is 3/4", "3/4", Decimal(3) / 4),  # a fraction
    ("The answer is 5 apples", "5 apples", None),  # trailing words on the same line: not a number (as PEFT)
    ("no answer given, 42", None, None),
])
def test_tricky_generations(text, answer, value):
    assert gsm8k.parse_answer(text) == answer
    assert gsm8k.answer_value(answer, thousands=True) == value


def test_lenient_mode_reads_separators_that_peft_compares_as_strings():
    assert not gsm8k.is_correct("The answer is: 1,600", "#### 1600")
    assert gsm8k.is_correct("The answer is: 1,600", "#### 1600", lenient=True)
    assert gsm8k.is_correct("The answer is: 1600", "#### 1,600", lenient=True)
    assert not gsm8k.is_correct("The answer is: 16,00", "#### 1600", lenient=True)
    ref = "so 8 own both.\nThe answer is <<8=8>>8.\n#### 8"
    assert not gsm8k.is_correct("The answer is: 8", ref) and gsm8k.is_correct("The answer is: 8", ref, lenient=True)
    with pytest.raises(ValueError, match="reference has no final answer"):
        gsm8k.is_correct("The answer is: 3", "three")


def test_answer_parsing_and_accuracy_equal_peft(peft):
    for case in peft["parse"]:
        assert gsm8k.parse_answer(case["text"]) == case["answer"], case["text"]
    for case in peft["accuracy"]:
        assert gsm8k.accuracy([case["prediction"]], [case["reference"]]) == case["correct"], case


def test_data_filter_prompt_and_truncation_equal_peft(peft):
    assert (metamath.CHAR_LIMIT, metamath.VALID_SIZE) == (peft["char_limit"], peft["valid_size"])
    assert [r["query"] for r in metamath.char_filter(peft["rows"])] == peft["kept_queries"]
    assert len(peft["kept_queries"]) < len(peft["rows"])
    assert math_common.TEMPLATE == peft["template"]

    class CharTokenizer:  # the generator's: BOS -1, then one id per character
        def __call__(self, texts):
            return {"input_ids": [[-1] + [ord(c) for c in t] for t in texts]}

    rows = peft["rows"][:6]
    n = peft["model_max_length"]
    assert math_family.encode(CharTokenizer(), rows, math_common.TEMPLATE, n, True) == peft["with_answer"]
    assert math_family.encode(CharTokenizer(), rows, math_common.TEMPLATE, n, False) == peft["wo_answer"]
    assert metamath.valid_indices(7473).tolist() == peft["valid_indices"]


def test_labels_and_loss_equal_peft(peft):
    case = peft["labels"]
    rows = [{"ids": np.asarray(x, np.int32)} for x in case["ids"]]
    longest = max(len(x) for x in case["ids"])
    batch = math_family.peft_labels(rows, longest + 3, longest, case["eos"])  # a bucket longer than the batch
    labels = np.asarray(case["labels"])
    np.testing.assert_array_equal(batch["ids"][:, :longest], np.where(labels >= 0, labels, case["eos"]))
    np.testing.assert_array_equal(batch["weights"][:, 1:longest], labels[:, 1:] >= 0)
    assert not batch["weights"][:, longest:].any() and not batch["weights"][:, 0].any()
    logits = np.concatenate([np.asarray(case["logits"], np.float32),
                             np.zeros((len(rows), 3, np.shape(case["logits"])[-1]), np.float32)], axis=1)
    nll = causal_lm.token_nll(jnp.asarray(logits[:, :-1]), jnp.asarray(batch["ids"][:, 1:]))
    np.testing.assert_allclose(float(math_family.peft_loss(nll, batch)), case["loss"], rtol=1e-6)


def test_bucketed_order_equals_peft_bucket_iterator(peft, monkeypatch):
    lengths = np.asarray(peft["bucket"]["lengths"])
    want = peft["bucket"]["batches"]
    order = math_family.bucket_order(lengths, 4, 20)  # torch's tie order, as PEFT sorts
    ours = order[: len(order) // 4 * 4].reshape(-1, 4).tolist()
    assert ours == want[: len(ours)]
    monkeypatch.setitem(sys.modules, "torch", None)  # without torch: the same lengths per batch
    order = math_family.bucket_order(lengths, 4, 20)
    ours = order[: len(order) // 4 * 4].reshape(-1, 4)
    assert lengths[ours].tolist() == [lengths[b].tolist() for b in want[: len(ours)]]


@pytest.mark.parametrize("steps", ["37", "5000"])
def test_schedule_equals_peft(peft, steps):
    c = llama32_3b_metamathqa.get_config()
    c.num_train_steps = int(steps)
    c = c.copy_and_resolve_references()
    schedule = optim.make_schedule(1e-3, c.optimizer, int(steps))
    want = peft["schedules"][steps]
    got = [float(schedule(k)) for k in want["steps"]]
    np.testing.assert_allclose(got, want["lrs"], rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("method, wd", [("vera", "None"), ("lora", "0.1")])
def test_adamw_with_clipping_equals_torch(peft, method, wd):
    c = math_common.base_config(f"method={method}").copy_and_resolve_references()
    case = peft["adamw"][wd]
    c.optimizer.schedule, c.optimizer.warmup_steps = "constant", 0
    c.optimizer.learning_rates = {"adapter": 1e-2}
    tx, _ = optim.make_optimizer(c.optimizer, {"w": "adapter"}, 10)
    params = {"w": jnp.asarray(case["start"], jnp.float32)}
    state = tx.init(params)
    for g in case["grads"]:
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params["w"]), case["end"], rtol=1e-5, atol=1e-6)


def test_configs_are_peft_experiments():
    c = llama32_3b_metamathqa.get_config()
    assert (c.model.checkpoint, c.vera.r, c.vera.d_initial, tuple(c.vera.targets), c.lr.vera) == (
        "meta-llama/Llama-3.2-3B", 256, 0.1, ("query", "value"), 1e-3)
    assert (c.data.max_length, c.batch_size, c.num_train_steps, c.optimizer.grad_clip_norm, c.optimizer.schedule,
            c.decode.max_new_tokens, c.eval_every, c.optimizer.weight_decay) == (768, 4, 5000, 1.0, "cosine", 300,
                                                                                 250, 0.01)
    lora = llama32_3b_metamathqa.get_config("method=lora")
    assert (lora.lora.r, lora.lora.alpha, lora.lora.dropout, lora.lr.lora, lora.optimizer.weight_decay) == (
        32, 64.0, 0.0, 1e-4, 0.1)
    small = smollm2_gsm8k.get_config()
    assert small.data.train == "gsm8k" and small.data.template == math_common.TEMPLATE


def test_generation_budget_follows_peft_batches():
    budgets = math_family.generation_budgets([10, 600, 20, 30], 300, 800, 2)
    assert budgets.tolist() == [200, 200, 300, 300]


@needs_gsm8k
def test_offline_metamathqa_fails_fast_naming_data_path(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    c = math_common.base_config()
    c.data.gsm8k_dir = GSM8K
    with pytest.raises(DataUnavailableError, match="--config.data.path="):
        math_family.load_data(c)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """config.json of a 2-layer LLaMA and a byte-level BPE tokenizer with an EOS token."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("llama")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([math_common.TEMPLATE, "The answer is: 12 #### 3 apples cost $5."], vocab_size=300,
                            min_frequency=1, special_tokens=["</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="</s>")
    tok.save_pretrained(root)
    (root / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "vocab_size": len(tok),
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.eos_token_id}))
    return str(root)


@needs_gsm8k
def test_tiny_llama_end_to_end_through_the_cli(llama_dir, tmp_path, method="vera"):
    rows = [{"query": f"Tom has {i} apples and buys {i + 2} more. How many?", "type": "GSM_Rephrased",
             "response": f"He has {i} + {i + 2} = {2 * i + 2} apples.\nThe answer is: {2 * i + 2}",
             "original_question": ""} for i in range(30)]
    rows.append({"query": "x" * 900, "response": "y" * 500, "type": "MATH_AnsAug", "original_question": ""})  # filtered
    data = tmp_path / "metamath.json"
    data.write_text(json.dumps(rows))
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.math", "--config", f"configs/llama32_3b_metamathqa.py:method={method}",
         "--workdir", str(workdir), f"--config.model.checkpoint={llama_dir}", "--config.model.random_init=True",
         "--config.model.dtype=float32", "--config.compute_dtype=float32", f"--config.data.path={data}",
         f"--config.data.gsm8k_dir={GSM8K}", "--config.data.valid_size=4", "--config.data.test_limit=6",
         "--config.data.max_length=96", "--config.data.buckets=()", "--config.data.bucket_factor=2",
         "--config.vera.r=8", "--config.num_train_steps=6", "--config.eval_every=3", "--config.eval_batch_size=4",
         "--config.decode.max_new_tokens=5", "--config.checkpoint_async=False", "--config.tensorboard=False",
         "--config.progress_bar=False", "--config.data_threads=1", "--config.data_prefetch=1"],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["family"] == "math" and line["method"] == method
    results = json.loads((workdir / "results.json").read_text())
    info = results["train_info"]
    assert info["num_trainable_params"] == line["trainable_params"] > 0
    assert info["file_size"] == os.path.getsize(workdir / "peft_adapter" / "adapter_model.safetensors")
    valid = [m for m in info["metrics"] if "valid accuracy" in m]
    assert [m["step"] for m in valid] == [3, 6]
    test = info["metrics"][-1]
    assert test["step"] == 6 and 0.0 <= test["test accuracy"] <= 1.0 and test["train samples"] == 24
    assert test["tokens / sec"] > 0 and info["train_time"] > 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["train_rows"] == 30 and summary["train_rows_before_filter"] == 31
    predictions = (workdir / "predictions" / "test_step_6.jsonl").read_text().splitlines()
    first = json.loads(predictions[0])
    assert len(predictions) == 6 and first["prediction"].startswith("Question: ")
    assert first["response"].rstrip().split("\n")[-1].startswith("#### ")


