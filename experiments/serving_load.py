"""A bounded load test of the OpenAI-compatible server on 127.0.0.1; prints a JSON record.

    python -m experiments.serving_load --requests=256 --concurrency=8,32,64 --slots=64 --json=load.json

Starts the server in this process (uvicorn on 127.0.0.1, a free port) over a small random LLaMA
(--hidden, --layers; random weights, no tokenizer: prompts are token ids) with --adapters random
VeRA adapters loaded from directories, compiles every shape (`Engine.warmup`), then for each
--concurrency level that many client threads send --requests streamed completions (random adapter
or the base, prompt length and max_tokens, greedy or sampled) until all are answered or --deadline
seconds pass. Reports per level p50/p99 latency and time to first token (the first streamed chunk
that carries a token), generated tokens/s and failed requests; and the process's resident memory
before and after, and the compiles during the load (none expected). --markdown also prints a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import socket
import tempfile
import threading
import time
from pathlib import Path

import flax.linen as nn
import httpx
import jax
import jax.numpy as jnp
import numpy as np

import vera_jax
from vera_jax.models import llama
from vera_jax.serving import BASE, AdapterBank, Engine
from vera_jax.serving.server import create_app


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return -1


def build(hidden: int, layers: int, adapters: int, slots: int, max_length: int, workdir: Path,
          prefill_batch: int | None = None):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 1000,
              "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": max_length,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}
    model = llama.build(config)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    bank = AdapterBank(params, config)
    for i in range(adapters):
        adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=16, targets=("query", "value")))
        leaves, tree = jax.tree.flatten(adapted.adapter)
        keys = jax.random.split(jax.random.key(100 + i), len(leaves))
        adapted = adapted.replace(adapter=jax.tree.unflatten(
            tree, [x + jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
        vera_jax.save_adapter(workdir / f"a{i}", adapted)
        bank.load(f"a{i}", workdir / f"a{i}")
    engine = Engine(model, bank, slots=slots, max_length=max_length, prefill_batch=prefill_batch)
    return create_app(engine, bank), engine, bank


def _percentile(values, q):
    return float(np.percentile(values, q)) if len(values) else None


def level(client, url, jobs, concurrency, deadline) -> dict:
    """Sends `jobs` from `concurrency` threads, each streamed; latency, TTFT and tokens per request."""
    stop_at = time.time() + deadline

    def send(job):
        if time.time() > stop_at:
            return None
        t0 = time.perf_counter()
        first, tokens = None, 0
        try:
            with client.stream("POST", f"{url}/v1/completions", json={**job, "stream": True}) as r:
                if r.status_code != 200:
                    return False, 0.0, None, 0
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return False, 0.0, None, 0
                    n = sum(len(c.get("token_ids") or ()) for c in chunk["choices"])
                    if n and first is None:
                        first = time.perf_counter() - t0
                    tokens += n
        except httpx.HTTPError:
            return False, 0.0, None, 0
        return True, time.perf_counter() - t0, first, tokens

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = [r for r in pool.map(send, jobs) if r is not None]
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[0]]
    latencies, ttfts = [r[1] for r in ok], [r[2] for r in ok if r[2] is not None]
    tokens = sum(r[3] for r in ok)
    return {"concurrency": concurrency, "requests_sent": len(results), "failed": len(results) - len(ok),
            "wall_s": wall, "p50_latency_s": _percentile(latencies, 50), "p99_latency_s": _percentile(latencies, 99),
            "p50_ttft_s": _percentile(ttfts, 50), "p99_ttft_s": _percentile(ttfts, 99), "generated_tokens": tokens,
            "tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall}


def run(requests, concurrency, adapters, slots, max_length, hidden, layers, deadline, prefill_batch=None) -> dict:
    """One server; each level of `concurrency` (an int or a sequence) in turn, on the same --requests jobs."""
    import uvicorn

    logging.getLogger("httpx").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        app_, engine, bank = build(hidden, layers, adapters, slots, max_length, Path(tmp), prefill_batch)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app_, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        start = time.time()
        while not server.started:
            if time.time() - start > 60:
                raise RuntimeError("server did not start in 60 s")
            time.sleep(0.1)
        rng = np.random.RandomState(0)
        names = [BASE] + bank.names()
        jobs = [{"model": names[rng.randint(len(names))], "prompt": rng.randint(3, 1000, rng.randint(1, 24)).tolist(),
                 "max_tokens": int(rng.randint(4, 17)), "temperature": float(rng.choice([0.0, 0.8])),
                 "seed": int(rng.randint(2**31))} for _ in range(requests)]
        engine.warmup()
        levels = (concurrency,) if isinstance(concurrency, int) else tuple(concurrency)
        limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
        with httpx.Client(timeout=120, limits=limits) as client:
            rss_before = rss_bytes()
            warm_compiles = dict(engine.compiles)
            results = [level(client, url, jobs, c, deadline) for c in levels]
            health = client.get(f"{url}/health").json()
            compiles_during_load = {k: v - warm_compiles.get(k, 0) for k, v in engine.compiles.items()}
        rss_after = rss_bytes()
        server.should_exit = True
        thread.join(30)
    return {"levels": results, "requests_per_level": requests, "slots": slots, "adapters": adapters,
            "prefill_batch": engine.stats()["prefill_batch"],
            "server_rss_before_bytes": rss_before, "server_rss_after_bytes": rss_after,
            "compiles_during_load": compiles_during_load, "engine": health["engine"],
            "model": {"family": "llama", "hidden": hidden, "layers": layers, "weights": "random",
                      "max_length": max_length},
            "device": jax.devices()[0].device_kind,
            "note": "server and clients share this process (in-process uvicorn); RSS is the whole process"}


def markdown(record: dict) -> str:
    rows = ["| clients | requests | failed | TTFT p50 s | TTFT p99 s | latency p50 s | latency p99 s | tokens/s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in record["levels"]:
        rows.append(f"| {r['concurrency']} | {r['requests_sent']} | {r['failed']} | {r['p50_ttft_s']:.3f} | "
                    f"{r['p99_ttft_s']:.3f} | {r['p50_latency_s']:.3f} | {r['p99_latency_s']:.3f} | "
                    f"{r['tokens_per_s']:.0f} |")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.serving_load", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=256, help="completions to send at each concurrency level")
    p.add_argument("--concurrency", type=_levels, default=(8, 32, 64), help="client threads: one level or a "
                   "comma-separated list, each run in turn")
    p.add_argument("--adapters", type=int, default=8, help="random VeRA adapters loaded")
    p.add_argument("--slots", type=int, default=32, help="engine slots")
    p.add_argument("--max_length", type=int, default=64, help="context per slot")
    p.add_argument("--hidden", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=2, help="model depth")
    p.add_argument("--prefill_batch", type=int, default=None,
                   help="most prompts per prefill call (default: the slots; 1: one at a time, as before batching)")
    p.add_argument("--deadline", type=float, default=600.0, help="seconds after which no more requests are sent")
    p.add_argument("--json", default=None, help="also write the record here")
    p.add_argument("--markdown", action="store_true", help="also print a table of the levels")
    return p.parse_args(argv)


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(","))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers separated by commas, e.g. 8,32,64")
    return levels


def main(argv=None) -> None:
    a = parse_args(argv)
    record = run(a.requests, a.concurrency, a.adapters, a.slots, a.max_length, a.hidden, a.layers, a.deadline,
                 a.prefill_batch)
    text = json.dumps(record)
    print(text)
    if a.markdown:
        print(markdown(record))
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
