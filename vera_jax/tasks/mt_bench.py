"""MT-Bench answers in FastChat's `gen_model_answer` format, from a model tuned by the instruct
family (or the untuned base).

Every question has two turns; the second prompt is the conversation so far (question 1, the
model's answer 1, question 2) rendered by the model's template (`instruct.prompt_ids`: the
Alpaca chat template, or the tokenizer's own). Temperatures per category are FastChat's
(`TEMPERATURES`; 0.7 for a category it does not list): rows at temperature 0 decode greedily,
the others sample (with HF generate's default top_k=50, which FastChat's call inherits) from a
per-row seed fixed by (seed, question_id, turn). The questions of a turn decode in batches of
similar prompt length, greedy and sampled rows apart. An answer is cut at the first EOS and
decoded without special tokens, then stripped, as FastChat does. One JSON line per question:
{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [a1, a2]}], "tstamp"}.
"""

from __future__ import annotations

import collections
import json
import os
import time
import uuid

import numpy as np

from vera_jax.models import generate

from . import instruct

TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}  # FastChat's temperature_config
DEFAULT_TEMPERATURE = 0.7  # FastChat's, for a category missing above
PAD_MULTIPLE = 64  # prompts are left-padded to a multiple of this (few compiled shapes)


def read_questions(path: str, limit: int = 0) -> list[dict]:
    """FastChat question.jsonl: {"question_id", "category", "turns": [str, ...]} per line; with
    limit > 0, only the first `limit` questions of each category (a sample of every category)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mt_bench.questions: {path} is not a file (FastChat's question.jsonl)")
    with open(path, encoding="utf-8") as f:
        questions = [json.loads(line) for line in f if line.strip()]
    for q in questions:
        if not {"question_id", "category", "turns"} <= set(q) or not q["turns"]:
            raise ValueError(f"mt_bench.questions: {path}: question {q.get('question_id')} lacks "
                             "question_id, category or turns")
    if limit > 0:
        seen = collections.Counter()
        kept = []
        for q in questions:
            seen[q["category"]] += 1
            if seen[q["category"]] <= limit:
                kept.append(q)
        questions = kept
    return questions


def temperature(category: str) -> float:
    return TEMPERATURES.get(category, DEFAULT_TEMPERATURE)


def _seed(seed: int, question_id: int, turn: int) -> int:
    return int(np.random.default_rng([seed, question_id, turn]).integers(2**32))


def decode_rows(module, params, tokenizer, prompts: list[list[int]], temperatures: list[float], seeds: list[int],
                *, max_new_tokens: int, batch_size: int, top_k: int, path, eos: int, pad: int,
                max_positions: int) -> tuple[list[str], int]:
    """One answer per prompt (and how many prompts were cut from the left to fit max_positions)."""
    limit = max_positions - max_new_tokens
    if limit < 1:
        raise ValueError(f"mt_bench.max_new_tokens: {max_new_tokens} leaves no room for a prompt in the "
                         f"model's {max_positions} positions")
    cut = sum(len(p) > limit for p in prompts)
    prompts = [p[-limit:] for p in prompts]
    answers = [""] * len(prompts)
    for greedy in (True, False):
        rows = sorted((i for i, t in enumerate(temperatures) if (t < 1e-4) == greedy), key=lambda i: len(prompts[i]))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = min(-(-max(len(prompts[i]) for i in chunk) // PAD_MULTIPLE) * PAD_MULTIPLE, limit)
            ids, mask = np.full((batch_size, width), pad, np.int32), np.zeros((batch_size, width), np.int32)
            pick = chunk + [chunk[-1]] * (batch_size - len(chunk))  # repeated to a full batch: one shape
            for j, i in enumerate(pick):
                ids[j, width - len(prompts[i]):], mask[j, width - len(prompts[i]):] = prompts[i], 1
            if greedy:
                tokens = generate.greedy(module, params, ids, mask, max_new_tokens, eos, pad, path=path)
            else:
                tokens = generate.sample(module, params, ids, mask, max_new_tokens, eos, pad,
                                         seeds=np.asarray([seeds[i] for i in pick], np.uint32),
                                         temperature=np.asarray([temperatures[i] for i in pick], np.float32),
                                         top_k=top_k, path=path)
            for j, i in enumerate(chunk):
                row = np.asarray(tokens[j]).tolist()
                row = row[:row.index(eos)] if eos in row else row
                answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return answers, cut


def answer(model, params, questions: list[dict], *, template: str, max_new_tokens: int, batch_size: int = 8,
           top_k: int = 50, seed: int = 0, path=None, log=print) -> tuple[list[list[str]], dict]:
    """Every question's answers, turn by turn (turn t's prompts hold the answers to turns < t),
    and facts for the log (truncated prompts, seconds per turn)."""
    tok = model.tokenizer
    if tok is None:
        raise FileNotFoundError(f"model.checkpoint {model.path} has no tokenizer; set model.tokenizer")
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.hf_config["eos_token_id"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    max_positions = int(model.hf_config.get("max_position_embeddings") or 4096)
    answers: list[list[str]] = [[] for _ in questions]
    facts = {"truncated_prompts": 0, "seconds_per_turn": []}
    for turn in range(max(len(q["turns"]) for q in questions)):
        rows = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
        prompts = []
        for i in rows:
            messages = []
            for t in range(turn + 1):
                messages.append({"role": "user", "content": questions[i]["turns"][t]})
                if t < turn:
                    messages.append({"role": "assistant", "content": answers[i][t]})
            prompts.append(instruct.prompt_ids(tok, messages, template))
        start = time.time()
        texts, cut = decode_rows(
            model.module, params, tok, prompts, [temperature(questions[i]["category"]) for i in rows],
            [_seed(seed, int(questions[i]["question_id"]), turn) for i in rows], max_new_tokens=max_new_tokens,
            batch_size=batch_size, top_k=top_k, path=path, eos=eos, pad=pad, max_positions=max_positions)
        facts["seconds_per_turn"].append(round(time.time() - start, 1))
        facts["truncated_prompts"] += cut
        for i, text in zip(rows, texts):
            answers[i].append(text)
        log(f"turn {turn + 1}: {len(rows)} answers in {facts['seconds_per_turn'][-1]} s")
    return answers, facts


def records(questions: list[dict], answers: list[list[str]], model_id: str) -> list[dict]:
    """FastChat's gen_model_answer lines, sorted by question_id as its reorg_answer_file leaves them."""
    out = [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22], "model_id": model_id,
            "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()} for q, turns in zip(questions, answers)]
    return sorted(out, key=lambda r: r["question_id"])


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)
