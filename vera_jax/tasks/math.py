"""The math-reasoning family: HF PEFT's MetaMathQA method comparison
(`method_comparison/MetaMathQA/`, data.py, run.py, utils.py) on the runner, so a VeRA or LoRA run
here sits beside PEFT's results JSON.

As PEFT does it: each training row is `template.format(query=query) + response`, tokenized with
the tokenizer's special tokens and cut to data.max_length; rows are taken in dataset order, in
chunks of batch_size * data.bucket_factor rows each sorted longest first, then batched in that
order (PEFT's BucketIterator; set shuffle=False, as the configs do). A batch is right-padded with
EOS; the labels are every token but the first (the prompt too) plus the first EOS after a row,
which the batch's longest row(s) do not get; the loss is their summed cross-entropy divided by
the batch's real tokens (transformers' num_items_in_batch). Validation (every eval_every steps)
and test (after the last step) decode greedily, at most decode.max_new_tokens new tokens and at
most decode.max_length in all for PEFT's batch of decode.peft_batch_size prompts, and score
prompt + generation with PEFT's answer parsing (`vera_jax.metrics.gsm8k`).

`finish` writes workdir/results.json in PEFT's layout (run_info, train_info with
accelerator_memory_max, train_time, file_size, num_trainable_params, metrics holding the
"valid accuracy" rows and the final "test accuracy"), with file_size that of the adapter written
in PEFT's format (VeRA with its projections, as PEFT saves it) to workdir/peft_adapter.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np

from vera_jax import data as data_lib
from vera_jax.data import metamath
from vera_jax.interop import save_peft_adapter
from vera_jax.metrics import gsm8k
from vera_jax.models import generate
from vera_jax.train import Eval

from . import causal_lm, runner

ADVICE = ("and MetaMathQA with --config.data.path=/path/to/MetaMathQA-395K.json (a JSON array or JSONL of "
          "{query, response}); GSM8K is read from --config.data.gsm8k_dir")
TRAIN_SOURCES = ("metamathqa", "gsm8k")


def load_data(config) -> dict:
    """Training rows (filtered by characters, in order), PEFT's 50 validation rows and the test split."""
    d = config.data
    if d.train not in TRAIN_SOURCES:
        raise runner.ConfigError(f"data.train: expected one of {TRAIN_SOURCES}, got {d.train!r}")
    if "{query}" not in d.template:
        raise runner.ConfigError(f"data.template: must contain '{{query}}', got {d.template!r}")
    gsm = metamath.load_gsm8k(d.gsm8k_dir)
    valid_idx = metamath.valid_indices(len(gsm["train"]), d.valid_size)
    valid = [gsm["train"].records[i] for i in valid_idx]
    test = gsm["test"].records[: d.test_limit] if d.test_limit > 0 else gsm["test"].records
    if d.train == "metamathqa":
        source = metamath.load_metamath(d.path, dataset=d.hub_dataset, filename=d.hub_file, revision=d.revision,
                                        timeout=config.network_timeout)
    else:  # GSM8K's train split without the validation rows
        held = set(valid_idx.tolist())
        source = metamath.Rows([r for i, r in enumerate(gsm["train"].records) if i not in held],
                               f"{gsm['train'].source} (without the {len(held)} validation rows)")
    train = metamath.char_filter(source.records, d.char_limit)
    if 0 < d.train_limit < len(train):
        train = train[: d.train_limit]
    return {"train": train, "valid": valid, "test": test, "source": source.source, "unfiltered": len(source)}


def encode(tokenizer, records: list[dict], template: str, max_length: int, with_response: bool) -> list[list[int]]:
    """Token ids of `template.format(query=query)` (+ the response right after it, for training),
    with the tokenizer's special tokens, cut to max_length (PEFT's tokenize_with/wo_answer)."""
    texts = [template.format(query=r["query"]) + (r["response"] if with_response else "") for r in records]
    return [list(x[:max_length]) for x in tokenizer(texts)["input_ids"]] if texts else []


def peft_loss(nll, batch):
    """The summed next-token cross-entropy `nll` (batch, T - 1) over the labelled positions,
    divided by the batch's real tokens (transformers' loss with num_items_in_batch)."""
    return (nll * batch["weights"][:, 1:]).sum() / jnp.maximum(batch["mask"].sum(), 1)


def bucket_order(lengths, batch_size: int, bucket_factor: int) -> np.ndarray:
    """PEFT's BucketIterator order: consecutive chunks of batch_size * bucket_factor rows, each
    sorted longest first. PEFT sorts with torch.argsort(descending=True), whose order among equal
    lengths is torch's own: it is used when torch is installed (as PEFT runs it, on CPU), else
    equal lengths keep row order (the same batches but for which equal-length rows share one)."""
    lengths = np.asarray(lengths, np.int64)
    try:
        import torch
    except ImportError:
        torch = None

    def sort(chunk):
        if torch is not None:
            return torch.argsort(torch.from_numpy(chunk), descending=True).numpy()
        return np.argsort(-chunk, kind="stable")

    size = batch_size * bucket_factor
    chunks = [s + sort(lengths[s: s + size]) for s in range(0, len(lengths), size)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)


def peft_labels(rows, length: int, longest: int, pad_id: int) -> dict:
    """Right-padded {"ids", "mask", "weights"} (len(rows), length): weights mark the positions
    PEFT labels, 1..min(n, longest - 1) of a row of n tokens (position n is its first EOS pad)."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask, weights = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        n = len(row["ids"])
        ids[i, :n], mask[i, :n] = row["ids"], 1
        weights[i, 1:min(n + 1, longest)] = 1
    return {"ids": ids, "mask": mask, "weights": weights}


def generation_budgets(prompt_lengths, max_new_tokens: int, max_length: int, peft_batch: int) -> np.ndarray:
    """New tokens each prompt gets in PEFT's evaluation: min(max_new_tokens, max_length - L) with L
    the longest prompt of its batch of `peft_batch` prompts in dataset order (at least 0)."""
    lengths = np.asarray(prompt_lengths)
    longest = np.concatenate([np.full(len(lengths[s: s + peft_batch]), lengths[s: s + peft_batch].max())
                              for s in range(0, len(lengths), peft_batch)])
    return np.maximum(np.minimum(max_new_tokens, max_length - longest), 0)


def make_parts(config, model: runner.Model, data) -> runner.Parts:
    d, dec, tok = config.data, config.decode, model.tokenizer
    if tok is None:
        raise FileNotFoundError(f"model.checkpoint {model.path} has no tokenizer; set model.tokenizer")
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.hf_config["eos_token_id"]
    pad = eos  # PEFT: tokenizer.pad_token = tokenizer.eos_token
    buckets = data_lib.bucket_lengths(d.max_length, tuple(d.buckets))
    rows = data["train"]
    if config.num_train_steps > 0:  # only the rows the run reaches (whole bucket chunks, so the order is PEFT's)
        chunk = config.batch_size * d.bucket_factor
        rows = rows[: -(-config.num_train_steps * config.batch_size // chunk) * chunk]
    ids = encode(tok, rows, d.template, d.max_length, with_response=True)
    order = bucket_order([len(x) for x in ids], config.batch_size, d.bucket_factor)
    train = [{"ids": np.asarray(ids[i], np.int32)} for i in order]
    if len(train) < config.batch_size:
        raise runner.ConfigError(f"batch_size: {config.batch_size} is more than the {len(train)} training rows")
    lengths = np.asarray([len(x["ids"]) for x in train])

    def collate(batch_rows, longest):
        return peft_labels(batch_rows, data_lib.bucket_for(longest, buckets), longest, pad)

    chunk = causal_lm.loss_chunk(config)

    def loss_fn(params, batch, rng):
        return peft_loss(causal_lm.next_token_losses(model.module, params, batch, chunk=chunk, rng=rng), batch), {}

    def eval_set(name, records, every):
        prompts = encode(tok, records, d.template, d.max_length, with_response=False)
        budgets = generation_budgets([len(p) for p in prompts], dec.max_new_tokens, dec.max_length,
                                     dec.peft_batch_size)
        by_length = np.argsort([len(p) for p in prompts], kind="stable")
        examples = [{"ids": np.asarray(prompts[i], np.int32), "index": np.int32(i)} for i in by_length]
        references = [r["response"] for r in records]

        def prompt_collate(batch_rows, longest):  # left-padded prompts, so every row continues at once
            n = data_lib.bucket_for(longest, buckets)
            out_ids, mask = np.full((len(batch_rows), n), pad, np.int32), np.zeros((len(batch_rows), n), np.int32)
            for i, row in enumerate(batch_rows):
                out_ids[i, n - len(row["ids"]):], mask[i, n - len(row["ids"]):] = row["ids"], 1
            return {"ids": out_ids, "mask": mask, "index": np.stack([row["index"] for row in batch_rows])}

        def eval_fn(adapted, batch):
            tokens = generate.greedy(model.module, adapted, batch["ids"], batch["mask"], dec.max_new_tokens, eos,
                                     pad, path=config.adapter_path)
            return {"tokens": tokens, "index": batch["index"]}

        def predictions(outputs) -> list[str]:  # PEFT decodes prompt + generation
            texts = [""] * len(records)
            for row, i in zip(outputs["tokens"], outputs["index"]):
                i = int(i)
                texts[i] = tok.decode(prompts[i] + row[: budgets[i]].tolist(), skip_special_tokens=True)
            return texts

        def metrics_fn(outputs):
            texts = predictions(outputs)
            return {"accuracy": gsm8k.accuracy(texts, references),
                    "accuracy_lenient": gsm8k.accuracy(texts, references, lenient=True)}

        def write_fn(workdir, step, outputs, metrics):
            out = os.path.join(workdir, "predictions", f"{name}_step_{step}.jsonl")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w", encoding="utf-8") as f:
                for text, record in zip(predictions(outputs), records):
                    f.write(json.dumps({"query": record["query"], "prediction": text, "response": record["response"],
                                        "correct": gsm8k.is_correct(text, record["response"])}) + "\n")

        return Eval(grain.MapDataset.source(examples), eval_fn, metrics_fn, every=every, collate=prompt_collate,
                    lengths=[len(prompts[i]) for i in by_length], write_fn=write_fn, on_adapted=True)

    evals = {}
    if data["valid"]:
        evals["valid"] = eval_set("valid", data["valid"], config.eval_every)
    evals["test"] = eval_set("test", data["test"], "end")

    def finish(workdir, summary, adapted):
        return write_results(workdir, config, model, summary, adapted, lengths)

    info = {"train_rows": len(data["train"]), "train_rows_encoded": len(train), "train_source": data["source"],
            "train_rows_before_filter": data["unfiltered"], "valid_rows": len(data["valid"]),
            "test_rows": len(data["test"]), "buckets": list(buckets),
            "train_rows_at_max_length": int(sum(len(x) == d.max_length for x in ids))}
    return runner.Parts(train=grain.MapDataset.source(train), loss_fn=loss_fn, collate=collate,
                        train_lengths=lengths, evals=evals, best_metric="valid/accuracy" if data["valid"] else "",
                        info=info, finish=finish)


def peft_adapter_size(workdir: str, adapted, hf_config: dict) -> tuple[int | None, str]:
    """Bytes of adapter_model.safetensors of `adapted` saved in PEFT's format, or (None, why not)."""
    try:
        path = save_peft_adapter(os.path.join(workdir, "peft_adapter"), adapted, hf_config)
    except (ValueError, TypeError) as e:
        return None, f"not writable in PEFT's format: {e}"
    return os.path.getsize(os.path.join(path, "adapter_model.safetensors")), str(path)


def train_tokens(lengths, batch_size: int, steps: int) -> int:
    """Tokens PEFT counts for `steps` steps: each batch's token count plus one EOS per row."""
    per_epoch = len(lengths) // batch_size
    rows = np.concatenate([np.arange(batch_size) + (s % per_epoch) * batch_size for s in range(steps)]) \
        if steps else np.zeros(0, np.int64)
    return int(np.asarray(lengths)[rows].sum() + len(rows))


def write_results(workdir: str, config, model, summary: dict, adapted, lengths) -> dict:
    """workdir/results.json in PEFT's layout; returns the facts it adds to the summary."""
    size, where = peft_adapter_size(workdir, adapted, model.hf_config)
    steps, train_time = summary["steps"], summary["train_time_s"]
    tokens = train_tokens(lengths, config.batch_size, steps)
    history = summary["evals"]
    train_loss = (summary["final"]["train"] or {}).get("train/loss")
    metrics = [{"step": h["step"], "valid accuracy": h["accuracy"]} for h in history if h["eval"] == "valid"]
    test = [h for h in history if h["eval"] == "test"]
    metrics.append({"step": steps, "test accuracy": test[-1]["accuracy"] if test else None,
                    "test accuracy (lenient parsing)": test[-1]["accuracy_lenient"] if test else None,
                    "train loss": train_loss, "train samples": steps * config.batch_size,
                    "train total tokens": tokens, "tokens / sec": tokens / train_time if train_time else None})
    total = int(sum(x.size for x in jax.tree.leaves(adapted.base)))
    results = {
        "run_info": {"created_at": None, "total_time": summary["wall_time_s"],
                     "experiment_name": f"{config.method}--{os.path.basename(str(config.model.checkpoint))}",
                     "train_config": json.loads(config.to_json_best_effort()), "peft_config": None,
                     "error_msg": ""},
        "train_info": {"accelerator_memory_max": summary.get("peak_memory_bytes"), "train_time": train_time,
                       "file_size": size, "num_trainable_params": summary["trainable_params"],
                       "num_total_params": total + summary["trainable_params"], "status": "success",
                       "metrics": metrics},
        "meta_info": {"devices": summary.get("devices"), "platform": jax.devices()[0].platform},
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return {"results_json": os.path.join(workdir, "results.json"), "peft_adapter": where,
            "test_accuracy": metrics[-1]["test accuracy"], "train_total_tokens": tokens}


FAMILY = runner.Family(name="math", load_data=load_data, make_parts=make_parts, advice=ADVICE,
                       user_errors=(metamath.MathDataError,),
                       run_name=lambda config: f"{config.data.train}-{config.method}-s{config.seed}")
