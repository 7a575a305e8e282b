"""The E2E NLG family (the paper's Table 3): a causal LM (GPT-2, or any LLaMA-architecture model
in the zoo) learns to realise a meaning representation (MR) as a restaurant description.

Formatting follows the LoRA reference setup (Hu et al. 2022, microsoft/LoRA examples/NLG): the MR
as context (after the tokenizer's BOS where it adds one by default, as Gemma's does), the EOS
token as separator, " " + reference as the continuation ending in EOS; the loss covers only the
continuation, with label smoothing. Evaluation decodes one output per distinct MR by beam search
(beam 10, length penalty 0.8, no-repeat-ngram 4, at most 64 new tokens, output cut at EOS or a
blank line) and scores it against all of that MR's references with the official scorer's five
metrics (`vera_jax.metrics.nlg`).
"""

from __future__ import annotations

import json
import os

import grain
import numpy as np

from vera_jax import data as data_lib
from vera_jax.data import e2e as e2e_data
from vera_jax.metrics import nlg
from vera_jax.models import generate
from vera_jax.train import Eval

from . import causal_lm, runner

ADVICE = "and the official CSVs with --config.data.dir=/path/to/e2e (trainset.csv, devset.csv, testset_w_refs.csv)"
STOP = "\n\n"


def load_data(config) -> dict:
    d = config.data
    load = dict(data_dir=d.dir, tfds_data_dir=d.tfds_data_dir or None, download=d.download,
                timeout=config.network_timeout)
    train = e2e_data.load_split("train", **load)
    mrs, refs = e2e_data.load_split(d.eval_split, **load).by_mr()
    if 0 < d.train_limit < len(train):  # a fixed random subset of pairs, the same for every seed
        keep = np.sort(np.random.default_rng(0).choice(len(train), d.train_limit, replace=False))
        train = e2e_data.Split([train.mrs[i] for i in keep], [train.refs[i] for i in keep],
                               f"{train.source} ({d.train_limit} of {len(train)} pairs, fixed random subset)")
    if d.eval_limit > 0:
        mrs, refs = mrs[: d.eval_limit], refs[: d.eval_limit]
    return {"train": train, "mrs": mrs, "refs": refs}


def make_parts(config, model: runner.Model, data) -> runner.Parts:
    d, dec, tok = config.data, config.decode, model.tokenizer
    if tok is None:
        raise FileNotFoundError(f"model.checkpoint {model.path} has no tokenizer; set model.tokenizer")
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.hf_config["eos_token_id"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = causal_lm.leading_special_tokens(tok)  # Gemma's <bos>: the model has never seen text without it
    buckets = data_lib.bucket_lengths(d.max_length, tuple(d.buckets))
    train, truncated = [], 0
    for mr, ref in zip(data["train"].mrs, data["train"].refs):
        context, target = bos + encode(mr) + [eos], encode(" " + ref) + [eos]
        ids = (context + target)[: d.max_length]
        truncated += len(context) + len(target) > d.max_length
        train.append({"ids": np.asarray(ids, np.int32), "prompt": np.int32(len(context))})
    prompts = [np.asarray(bos + (encode(mr) + [eos])[len(bos) - d.max_length:], np.int32) for mr in data["mrs"]]
    order = np.argsort([len(p) for p in prompts], kind="stable")

    def collate(rows, longest):  # the continuation after the separator is the target
        return causal_lm.pad_targets(rows, data_lib.bucket_for(longest, buckets), pad)

    def prompt_collate(rows, longest):  # left-padded prompts, so generation continues every row at once
        n = data_lib.bucket_for(longest, buckets)
        ids, mask = np.full((len(rows), n), pad, np.int32), np.zeros((len(rows), n), np.int32)
        for i, row in enumerate(rows):
            ids[i, n - len(row["ids"]):], mask[i, n - len(row["ids"]):] = row["ids"], 1
        return {"ids": ids, "mask": mask, "index": np.stack([row["index"] for row in rows])}

    chunk = causal_lm.loss_chunk(config)

    def loss_fn(params, batch, rng):
        return causal_lm.shifted_loss_of(model.module, params, batch, chunk=chunk, smoothing=config.label_smoothing,
                                         rng=rng), {}

    def eval_fn(adapted, batch):
        tokens = generate.beam_search(model.module, adapted, batch["ids"], batch["mask"], dec.max_new_tokens,
                                      dec.num_beams, dec.length_penalty, eos, pad,
                                      no_repeat_ngram_size=dec.no_repeat_ngram_size, path=config.adapter_path)
        return {"tokens": tokens, "index": batch["index"]}

    def predictions(outputs) -> list[str]:
        texts = [""] * len(prompts)
        for row, i in zip(outputs["tokens"], outputs["index"]):
            row = row.tolist()
            row = row[: row.index(eos)] if eos in row else row
            texts[int(i)] = tok.decode(row, skip_special_tokens=True).split(STOP)[0].strip().replace("\n", " ")
        return texts

    def write_fn(workdir, step, outputs, metrics):
        out = os.path.join(workdir, "predictions", f"step_{step}")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "predictions.txt"), "w", encoding="utf-8") as f:
            f.writelines(p + "\n" for p in predictions(outputs))
        with open(os.path.join(out, "references.json"), "w", encoding="utf-8") as f:
            json.dump({"mrs": data["mrs"], "references": data["refs"]}, f, ensure_ascii=False, indent=1)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)

    examples = [{"ids": prompts[i], "index": np.int32(i)} for i in order]
    evaluation = Eval(grain.MapDataset.source(examples), eval_fn,
                      lambda out: nlg.score_e2e(predictions(out), data["refs"]),
                      every=config.eval_every, collate=prompt_collate, lengths=[len(prompts[i]) for i in order],
                      write_fn=write_fn, on_adapted=True)
    info = {"train_pairs": len(train), "train_source": data["train"].source, "eval_mrs": len(prompts),
            "eval_split": d.eval_split, "truncated_pairs": int(truncated), "buckets": list(buckets)}
    return runner.Parts(train=grain.MapDataset.source(train), loss_fn=loss_fn, collate=collate,
                        train_lengths=np.asarray([len(x["ids"]) for x in train]), sort_window=d.sort_window,
                        evals={d.eval_split: evaluation}, best_metric="BLEU", info=info)


FAMILY = runner.Family(name="e2e", load_data=load_data, make_parts=make_parts, advice=ADVICE,
                       user_errors=(e2e_data.E2EDataError, nlg.JavaNotFoundError))
