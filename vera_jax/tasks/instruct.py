"""The instruction-tuning family (the paper's Table 4): a causal LM (LLaMA architecture) learns
to answer alpaca-format instructions.

Each record becomes prompt + output + EOS, with the prompt in the Stanford Alpaca format
(data.template="alpaca", the paper's and QLoRA's) or the tokenizer's own chat template as one
user turn ("chat"); the loss is the mean cross-entropy over response tokens only (output and
EOS; no label smoothing). Examples longer than data.max_length tokens are cut at the end, and
those whose prompt alone fills it are dropped (both counted in the summary). Batches are padded
to length buckets, with windows of batches sorted by length (`vera_jax.train.data`); the summary
says what fraction of the padded positions is padding. A fixed random slice of data.eval_size
records is held out; its eval is the mean response loss per token (cheap: one forward pass, no
decoding), every config.eval_every steps.
"""

from __future__ import annotations

import grain
import numpy as np

from vera_jax import data as data_lib
from vera_jax.data import alpaca
from vera_jax.train import Eval

from . import causal_lm, runner

TEMPLATES = ("alpaca", "chat")
ADVICE = ("and the data with --config.data.path=/path/to/alpaca_data_cleaned.json (alpaca-format JSON/JSONL, "
          "e.g. ../shared/data/instruct/alpaca_data.json)")


def chat_template(tokenizer, template: str):
    """The Jinja template `apply_chat_template` renders with: Alpaca's, or the tokenizer's own."""
    if template not in TEMPLATES:
        raise runner.ConfigError(f"data.template: expected one of {TEMPLATES}, got {template!r}")
    if template == "alpaca":
        return alpaca.ALPACA_CHAT_TEMPLATE
    if not getattr(tokenizer, "chat_template", None):
        raise runner.ConfigError("data.template: 'chat' needs a tokenizer with a chat template; this one has none "
                                 "(use 'alpaca')")
    return tokenizer.chat_template


def prompt_ids(tokenizer, messages: list[dict], template: str) -> list[int]:
    """Token ids of a conversation ending in a user turn, ready for the assistant's answer. The
    Alpaca prompt gets the tokenizer's own special tokens (e.g. LLaMA's BOS), as Stanford's
    training does; a model's chat template writes its own."""
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template(tokenizer, template),
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=template == "alpaca")["input_ids"]


def load_data(config) -> dict:
    """Checked records split into a held-out eval slice and the training records (a fixed random
    subset of data.limit when > 0), the same split for every seed."""
    d = config.data
    got = alpaca.load(d.path, dataset=d.hub_dataset, filename=d.hub_file, revision=d.revision,
                      bad_records=d.bad_records, timeout=config.network_timeout)
    if not 0 <= d.eval_size < len(got):
        raise runner.ConfigError(f"data.eval_size: {d.eval_size} must be >= 0 and below the {len(got)} records")
    order = np.random.default_rng(0).permutation(len(got))
    held, rest = np.sort(order[:d.eval_size]), order[d.eval_size:]
    if 0 < d.limit < len(rest):
        rest = rest[:d.limit]
    return {"train": [got.records[i] for i in np.sort(rest)], "eval": [got.records[i] for i in held],
            "source": got.source, "bad": got.bad}


def encode(tokenizer, records: list[dict], template: str, eos: int, max_length: int) -> tuple[list[dict], int, int]:
    """Examples {"ids", "prompt"} (prompt + output + EOS cut to max_length; "prompt": the
    prompt's token count), how many were cut, and how many were dropped because the prompt alone
    fills max_length (no response token would be left to learn)."""
    if template == "alpaca":
        prompts = [tokenizer(alpaca.format_prompt(r))["input_ids"] for r in records]
    else:
        prompts = [prompt_ids(tokenizer, [{"role": "user", "content": alpaca.user_message(r)}], template)
                   for r in records]
    outputs = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]
    examples, cut, dropped = [], 0, 0
    for prompt, output in zip(prompts, outputs):
        ids = prompt + output + [eos]
        if len(prompt) >= max_length:
            dropped += 1
            continue
        cut += len(ids) > max_length
        examples.append({"ids": np.asarray(ids[:max_length], np.int32), "prompt": np.int32(len(prompt))})
    return examples, cut, dropped


def make_parts(config, model: runner.Model, data) -> runner.Parts:
    d, tok = config.data, model.tokenizer
    if tok is None:
        raise FileNotFoundError(f"model.checkpoint {model.path} has no tokenizer; set model.tokenizer")
    chat_template(tok, d.template)
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.hf_config["eos_token_id"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    buckets = data_lib.bucket_lengths(d.max_length, tuple(d.buckets))
    train, cut, dropped = encode(tok, data["train"], d.template, eos, d.max_length)
    held, held_cut, held_dropped = encode(tok, data["eval"], d.template, eos, d.max_length)
    if len(train) < config.batch_size:
        raise runner.ConfigError(f"data.max_length: {d.max_length} leaves {len(train)} training examples with a "
                                 f"response token (prompts of {dropped} fill it), fewer than batch_size")

    def collate(rows, longest):  # response tokens (output and EOS) are the target
        return causal_lm.pad_targets(rows, data_lib.bucket_for(longest, buckets), pad)

    chunk = causal_lm.loss_chunk(config)

    def loss_fn(params, batch, rng):
        return causal_lm.shifted_loss_of(model.module, params, batch, chunk=chunk, rng=rng), {}

    def eval_fn(params, batch):
        weights = batch["weights"][:, 1:]
        nll = causal_lm.next_token_losses(model.module, params, batch, chunk=chunk)
        return {"nll": (nll * weights).sum(-1), "tokens": weights.sum(-1)}

    def metrics_fn(out):
        loss = float(out["nll"].sum() / max(out["tokens"].sum(), 1))
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}

    held_lengths = np.asarray([len(x["ids"]) for x in held])
    order = np.argsort(held_lengths, kind="stable")
    evals = {}
    if held:
        evals["heldout"] = Eval(grain.MapDataset.source([held[i] for i in order]), eval_fn, metrics_fn,
                                every=config.eval_every, collate=collate, lengths=held_lengths[order])
    lengths = np.asarray([len(x["ids"]) for x in train])
    padding = data_lib.padding_fraction(lengths, config.batch_size, buckets, sort_window=d.sort_window,
                                        seed=config.seed, shuffle=config.shuffle)
    response = np.asarray([len(x["ids"]) - int(x["prompt"]) for x in train])
    info = {"train_records": len(train), "eval_records": len(held), "data_source": data["source"],
            "bad_records": len(data["bad"]), "bad_record_indices": [i for i, _ in data["bad"][:100]],
            "template": d.template, "max_length": d.max_length, "truncated_train": cut,
            "truncated_eval": held_cut, "dropped_train": dropped,
            "dropped_eval": held_dropped, "buckets": list(buckets), "padding_fraction": round(padding, 4),
            "train_tokens": int(lengths.sum()), "response_tokens": int(response.sum())}
    return runner.Parts(train=grain.MapDataset.source(train), loss_fn=loss_fn, collate=collate,
                        train_lengths=lengths, sort_window=d.sort_window, evals=evals,
                        best_metric="heldout/loss" if held else "", info=info)


FAMILY = runner.Family(name="instruct", load_data=load_data, make_parts=make_parts, advice=ADVICE,
                       user_errors=(alpaca.AlpacaDataError,),
                       run_name=lambda config: f"{config.method}-s{config.seed}")
