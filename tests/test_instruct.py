"""Instruction tuning end to end, offline: alpaca records from files and the Hub cache the test
writes (bad records reported by index), the Stanford prompt and its chat-template form, a tiny
LLaMA drawn from a config.json beside a byte-level BPE tokenizer with a chat template, VeRA and
LoRA through the runner with response-only loss, MT-Bench answers in FastChat's format, the
paper's configs and the offline advice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from _train_tiny import override  # dotted-key config overrides, shared with the trainer tests

from configs import instruct_common, llama2_7b_alpaca, llama2_13b_alpaca, llama_7b_alpaca, llama_13b_alpaca
from vera_jax.data import DataUnavailableError, alpaca
from vera_jax.tasks import instruct, mt_bench, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "list", "name", "three", "colors", "animals"]


def records(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = rng.choice(WORDS, 2)
        out.append({"instruction": f"Name {a} and {b}.", "input": f"{b} {a}" if i % 3 == 0 else "",
                    "output": " ".join(rng.choice(WORDS, int(rng.integers(2, 30))))})
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = records(40)
    rows[5]["output"] = ""  # empty output
    del rows[9]["input"]  # missing field
    path = tmp_path_factory.mktemp("alpaca") / "alpaca.json"
    path.write_text(json.dumps(rows, indent=4))
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """config.json of a 2-layer LLaMA and a byte-level BPE tokenizer with a chat template."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("llama")
    texts = [alpaca.format_prompt(r) + r["output"] for r in records(40)] + [CHAT]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=["<|im_end|>", "<|im_start|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>")
    tok.chat_template = CHAT
    tok.save_pretrained(root)
    (root / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "vocab_size": len(tok),
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.eos_token_id}))
    return str(root)


def tiny_config(checkpoint, data_path, method="vera", **fields):
    c = instruct_common.base_config(f"method={method}")
    c.model.checkpoint, c.model.random_init, c.data.path = checkpoint, True, data_path
    c.data.max_length, c.data.buckets, c.data.eval_size, c.data.sort_window = 96, (48, 64), 6, 2
    c.vera.r, c.lora.r = 16, 4
    c.batch_size, c.grad_accum_steps, c.eval_batch_size, c.eval_every = 8, 2, 4, 2
    c.checkpoint_async, c.tensorboard, c.progress_bar, c.log_every_steps = False, False, False, 1
    c.data_threads = c.data_prefetch = 1
    return override(c, fields)


def test_prompts_are_stanford_alpaca_with_and_without_input(llama_dir):
    from transformers import AutoTokenizer

    with_input = alpaca.format_prompt({"instruction": "Add.", "input": "2 3", "output": "5"})
    assert with_input == ("Below is an instruction that describes a task, paired with an input that provides further "
                          "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                          "Add.\n\n### Input:\n2 3\n\n### Response:\n")
    without = alpaca.format_prompt({"instruction": "Add.", "input": "", "output": "5"})
    assert without == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                       "the request.\n\n### Instruction:\nAdd.\n\n### Response:\n")
    tok = AutoTokenizer.from_pretrained(llama_dir)
    one = [{"role": "user", "content": "Add."}]
    assert instruct.prompt_ids(tok, one, "alpaca") == tok(without)["input_ids"]
    two = tok.apply_chat_template(one + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "Again."}],
                                  chat_template=alpaca.ALPACA_CHAT_TEMPLATE, tokenize=False)
    assert two == without + "5<|im_end|>\n\n### Instruction:\nAgain.\n\n### Response:\n"
    chat = tok.decode(instruct.prompt_ids(tok, one, "chat"))
    assert chat == "<|im_start|>user\nAdd.<|im_end|>\n<|im_start|>assistant\n"


def test_bad_records_are_reported_by_index_then_skipped_or_refused(data_file, tmp_path, caplog):
    got = alpaca.load(data_file)
    assert len(got) == 38 and got.bad == [(5, "empty output"), (9, "missing field(s) ['input']")]
    assert "record 5: empty output" in caplog.text and "record 9" in caplog.text
    with pytest.raises(alpaca.AlpacaDataError, match=r"2 bad record\(s\).*record 5: empty output; record 9"):
        alpaca.load(data_file, bad_records="refuse")
    with pytest.raises(ValueError, match="data.bad_records"):
        alpaca.load(data_file, bad_records="drop")
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records(3)) + "\n\n")
    assert alpaca.load(str(jsonl)).records == records(3)
    jsonl.write_text('{"instruction": "x"}\n{oops\n')
    with pytest.raises(alpaca.AlpacaDataError, match=r"a.jsonl:2:"):
        alpaca.load(str(jsonl))


def test_hub_dataset_reads_the_cache_and_offline_fails_fast_with_advice(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.time()
    with pytest.raises(DataUnavailableError, match=r"yahma/alpaca-cleaned.*--config.data.path=/path/to/alpaca_data"):
        alpaca.hub_file(cache_dir=str(tmp_path / "empty"))
    assert time.time() - start < 10
    repo = tmp_path / "hub" / "datasets--yahma--alpaca-cleaned"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "alpaca_data_cleaned.json").write_text(json.dumps(records(4)))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    path = alpaca.hub_file(cache_dir=str(tmp_path / "hub"))
    assert alpaca.check(alpaca.read_file(path), path).records == records(4)


@pytest.mark.parametrize("method", ["vera", "lora"])
def test_family_trains_on_response_tokens_and_evals_held_out_loss(method, llama_dir, data_file, tmp_path):
    summary = runner.run(instruct.FAMILY, tiny_config(llama_dir, data_file, method), str(tmp_path))
    assert (summary["train_records"], summary["eval_records"], summary["bad_records"]) == (32, 6, 2)
    assert summary["bad_record_indices"] == [5, 9] and summary["steps"] == 4
    assert 0.0 <= summary["padding_fraction"] < 0.6 and summary["buckets"] == [48, 64, 96]
    assert [e["step"] for e in summary["evals"]] == [2, 4] and summary["best"]["eval"] == "heldout"
    assert all(np.isfinite(e["loss"]) and e["perplexity"] > 1 for e in summary["evals"])
    assert (tmp_path / "adapter").is_dir()


def test_loss_weights_cover_the_response_and_long_examples_are_cut(llama_dir, data_file):
    task, info, _ = runner.build(instruct.FAMILY, tiny_config(llama_dir, data_file, **{"data.max_length": 50}))
    assert info["truncated_train"] > 0 and info["dropped_train"] > 0
    assert len(task.train_data) == 32 - info["dropped_train"]
    assert all(int(x["prompt"]) < len(x["ids"]) <= 50 for x in task.train_data)
    row = next(x for x in task.train_data if len(x["ids"]) < 50)
    batch = task.collate([row], len(row["ids"]))
    n, p = len(row["ids"]), int(row["prompt"])
    assert batch["weights"][0].tolist() == [0] * p + [1] * (n - p) + [0] * (batch["ids"].shape[1] - n)
    with pytest.raises(runner.ConfigError, match="data.max_length"):
        runner.build(instruct.FAMILY, tiny_config(llama_dir, data_file, **{"data.max_length": 24}))


def test_mt_bench_answers_are_fastchat_records_with_two_turns(llama_dir, data_file, tmp_path):
    import vera_jax

    config = tiny_config(llama_dir, data_file, num_train_steps=1)
    runner.run(instruct.FAMILY, config, str(tmp_path / "run"))
    questions = [{"question_id": 81 + i, "category": c, "turns": [f"Name {w}.", "Again, shorter."]}
                 for i, (c, w) in enumerate(zip(["writing", "math", "stem", "coding", "roleplay"], WORDS))]
    qfile = tmp_path / "question.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    model = runner.load_model(config)
    adapted = vera_jax.load_adapter(str(tmp_path / "run" / "adapter"), model.params)
    kw = dict(template="alpaca", max_new_tokens=6, batch_size=2, top_k=50, seed=0, path="auto", log=lambda s: None)
    answers, facts = mt_bench.answer(model, adapted, mt_bench.read_questions(str(qfile), limit=1), **kw)
    again, _ = mt_bench.answer(model, adapted, questions, **kw)
    assert answers == again and facts["truncated_prompts"] == 0 and len(facts["seconds_per_turn"]) == 2
    rows = mt_bench.records(questions, answers, "tiny-vera")
    out = tmp_path / "model_answer" / "tiny-vera.jsonl"
    mt_bench.write_jsonl(str(out), rows)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in lines] == list(range(81, 86))
    for r in lines:
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"} and r["model_id"] == "tiny-vera"
        (choice,) = r["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == 2 and all(isinstance(t, str) for t in choice["turns"])
    assert [mt_bench.temperature(q["category"]) for q in questions] == [0.7, 0.0, 0.1, 0.0, 0.7]
    cli = subprocess.run(
        [sys.executable, "-m", "experiments.mt_bench", "--config", "configs/smollm2_alpaca.py",
         f"--config.model.checkpoint={llama_dir}", "--config.model.random_init=True",
         f"--config.mt_bench.questions={qfile}", "--config.mt_bench.max_new_tokens=4", "--config.mt_bench.batch_size=2",
         "--adapter", str(tmp_path / "run" / "adapter")], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    written = tmp_path / "run" / "model_answer" / f"{os.path.basename(llama_dir)}-vera.jsonl"
    assert json.loads(cli.stdout.strip().splitlines()[-1])["output"] == str(written)
    assert [len(json.loads(line)["choices"][0]["turns"]) for line in written.read_text().splitlines()] == [2] * 5
    real = os.path.join(ROOT, "..", "shared", "data", "mt_bench", "question.jsonl")
    if os.path.isfile(real):
        assert len(mt_bench.read_questions(real)) == 80
        sample = mt_bench.read_questions(real, limit=1)
        assert [q["question_id"] for q in sample] == [81, 91, 101, 111, 121, 131, 141, 151]


def test_configs_carry_table_9():
    for module, ckpt, dropout in ((llama_7b_alpaca, "huggyllama/llama-7b", 0.1),
                                  (llama_13b_alpaca, "huggyllama/llama-13b", 0.05),
                                  (llama2_7b_alpaca, "meta-llama/Llama-2-7b-hf", 0.1),
                                  (llama2_13b_alpaca, "meta-llama/Llama-2-13b-hf", 0.05)):
        c = module.get_config()
        assert (c.model.checkpoint, c.method, c.vera.r, c.lr.vera, c.optimizer.schedule, c.optimizer.warmup_ratio,
                c.batch_size, c.grad_accum_steps, c.num_epochs) == (ckpt, "vera", 1024, 4e-3, "cosine", 0.1, 16, 4, 1.0)
        assert tuple(c.vera.targets) == ("query", "key", "value", "attn_out", "gate", "up", "down")
        lora = module.get_config("method=lora")
        assert (lora.lora.r, lora.lr.lora, lora.lora.alpha, lora.lora.dropout) == (64, 4e-4, 16.0, dropout)
        assert c.mt_bench.max_new_tokens == 1024 and c.data.hub_dataset == "yahma/alpaca-cleaned"


def test_offline_training_exits_within_seconds_saying_what_to_do(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "experiments.instruct", "--config", "configs/llama2_7b_alpaca.py",
                           "--workdir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--config.model.checkpoint=" in proc.stderr and "--config.data.path=" in proc.stderr
    assert time.time() - start < 60
