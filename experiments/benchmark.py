"""Train-step cost of VeRA next to the frozen model's own forward + backward (the floor), LoRA,
full fine-tuning and, optionally, HF PEFT on the same shapes.

    python -m experiments.benchmark --model roberta-base --layers 2 --batch 8 --seq 512
    python -m experiments.benchmark --model roberta-base --layers 2 --batch 8 --seq 512 --against peft
    python -m experiments.benchmark --crossover --model roberta-base

Methods (vera_jax, one jitted step each, random weights built from a bundled HF config):
  floor          frozen model, forward + backward to the token embeddings' output only (a zero
                 tensor added there through `nn.intercept_methods`; no weight gradient)
  vera_merged    VeRA, `apply_adapted(path="merged")`; vera_factored / vera_auto likewise
  lora           LoRA r=--lora_r, alpha = r, `apply_adapted(path="auto")`
  full           full fine-tuning (`apply_full`, every leaf trained)
Every adapter step is value_and_grad over `partition(adapted)[0]` (adapter vectors only, no
head), then an optax.adamw update, jitted with the trainable part and the optimizer state
donated. Targets: query and value. Loss: cross-entropy against fixed random labels (class
labels for RoBERTa's classification head, next tokens for the causal LMs). Dropout is off on
both sides (deterministic JAX apply, torch `eval()` mode, which leaves autograd untouched).

Figures: step time (median of --iters after --warmup untimed steps, `block_until_ready`),
compile time (`jit(f).lower(*args).compile()`), memory from `compiled.memory_analysis()`
(peak estimate = argument + output + temp - alias) and the backend's peak where it reports one
(`memory_stats()["peak_bytes_in_use"]`: the process high-water mark after that method ran, so it
only grows down the table; None on CPU). XLA temp is the activation memory, the part the paths
change; arguments hold the frozen model (and VeRA's A, B), and the floor's output holds its
input gradient (batch x seq x hidden). Every figure is also given as a ratio to the floor
measured in the same run, and the machine's load average is printed, since timings on a busy
machine mean little.

Depth: the floor back-propagates through the lowest layer to the embeddings, while an adapter
step stops at the lowest adapted layer's weights, so with very few layers (--layers 1) the
adapters skip a larger share of the floor's work than in the full model. Use several layers
(the ratios then approach the full model's) when reporting.

`--against peft` runs the same shapes through transformers + HF PEFT in PyTorch (CUDA when
available, else CPU with torch.set_num_threads(os.cpu_count())): the floor (hook on the
embedding output, every weight frozen), PEFT VeRA and PEFT LoRA with torch.optim.AdamW. PEFT
runs eagerly, so its "compile" column is the first step's time; its memory is CUDA's
max_memory_allocated (None on CPU). GPT-2's HF attention is one fused c_attn, which PEFT can
only adapt whole (query, key and value), while vera_jax adapts query and value.

`--crossover`: one Dense layer of the model's width (768 for RoBERTa-base), VeRA at several
ranks and token counts, merged against factored gradient step (adapter vectors and the input,
as inside a model), next to `vera_jax.choose_path`'s prediction.

The markdown table goes to stdout, then the JSON record as the last line (and to --json PATH).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import vera_jax
from vera_jax.models import hub

METHODS = ("floor", "vera_merged", "vera_factored", "vera_auto", "lora", "full")
VERA_PATHS = {"vera_merged": "merged", "vera_factored": "factored", "vera_auto": "auto"}
TARGETS = ("query", "value")

# A small LLaMA (not a released checkpoint): LLaMA's layout at a size a CPU can train.
LLAMA_SMALL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "initializer_range": 0.02,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
    "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
    "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
}

# model name -> VeRA rank the paper uses for it (VeRA Tables 1, 2 and Section 4.3).
PAPER_RANK = {"roberta-base": 1024, "roberta-large": 256, "gpt2-medium": 1024, "llama-small": 1024}
# model_type -> (our embedding module, HF module names PEFT targets for query/value)
FAMILY = {
    "roberta": ("embeddings", ["query", "value"]),
    "gpt2": ("wte", ["c_attn"]),
    "llama": ("embed_tokens", ["q_proj", "v_proj"]),
}
LAYER_KEY = {"roberta": "num_hidden_layers", "gpt2": "n_layer", "llama": "num_hidden_layers"}


# ---------------------------------------------------------------- shapes and data


def model_config(name: str, layers: int | None = None, hidden: int | None = None) -> dict:
    """HF config dict for `name` (RoBERTa with a 2-class head), with depth/width overrides.

    `hidden` also sets the MLP width (4x; LLaMA 8/3x rounded up to 8) and one head per 64 features."""
    if name not in PAPER_RANK:
        raise ValueError(f"--model: {name!r} is not one of {sorted(PAPER_RANK)}")
    cfg = dict(LLAMA_SMALL) if name == "llama-small" else hub.bundled_config(name)
    kind = cfg["model_type"]
    if kind == "roberta":
        cfg = hub.task_config(cfg, num_labels=2)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers: expected >= 1, got {layers}")
        cfg[LAYER_KEY[kind]] = layers
    if hidden is not None:
        heads = max(1, hidden // 64)
        if hidden < 8 or hidden % heads:
            raise ValueError(f"--hidden: {hidden} must be >= 8 and divisible into {heads} heads of 64")
        if kind == "gpt2":
            cfg.update(n_embd=hidden, n_head=heads)
        else:
            cfg.update(hidden_size=hidden, num_attention_heads=heads,
                       intermediate_size=4 * hidden if kind == "roberta" else -(-8 * hidden // 24) * 8)
        if kind == "llama":
            cfg["num_key_value_heads"] = max(1, heads // 2)
    return cfg


def shape_summary(cfg: dict, name: str) -> dict:
    kind = cfg["model_type"]
    full_depth = (LLAMA_SMALL if name == "llama-small" else hub.bundled_config(name))[LAYER_KEY[kind]]
    return {"model": name, "model_type": kind, "layers": cfg[LAYER_KEY[kind]], "full_layers": full_depth,
            "hidden": cfg.get("hidden_size", cfg.get("n_embd"))}


def make_batch(cfg: dict, batch: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids (never RoBERTa's pad id, so no position is masked) and fixed labels."""
    if cfg["model_type"] == "roberta" and seq + cfg["pad_token_id"] + 1 > cfg["max_position_embeddings"]:
        raise ValueError(f"--seq: {seq} is longer than RoBERTa's {cfg['max_position_embeddings'] - 2} positions")
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg["vocab_size"], (batch, seq), dtype=np.int32)
    if cfg["model_type"] == "roberta":
        labels = rng.integers(0, 2, (batch,), dtype=np.int32)
    else:
        labels = rng.integers(0, cfg["vocab_size"], (batch, seq), dtype=np.int32)
    return ids, labels


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


# ---------------------------------------------------------------- measuring


def memory(compiled) -> dict:
    """XLA's compile-time memory figures (bytes) and the backend's peak, where it has one."""
    m = compiled.memory_analysis()
    out: dict[str, Any] = {}
    if m is not None:
        out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
               "temp": int(m.temp_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
        out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    stats = jax.devices()[0].memory_stats()
    out["device_peak"] = int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
    return out


def measure(fn: Callable, args: tuple, iters: int, warmup: int, donate: tuple[int, ...] = (),
            carry: int = 0) -> dict:
    """Compile `fn` on `args`, then time it. The first `carry` outputs feed the next call's first
    `carry` arguments (the donated trainable part and optimizer state)."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if carry:
            args = tuple(out[:carry]) + tuple(args[carry:])
    return {"step_ms": 1e3 * statistics.median(times), "compile_s": compile_s, "memory": memory(compiled)}


def embedding_eps(model: nn.Module, embed_name: str) -> Callable:
    """`loss(params, eps, ids, labels)`: the model with `eps` added to its embedding's output."""

    def loss(params, eps, ids, labels):
        def add_eps(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            module = context.module
            if context.method_name == "__call__" and module.scope and tuple(module.scope.path) == (embed_name,):
                out = out + eps.astype(out.dtype)
            return out

        with nn.intercept_methods(add_eps):
            return cross_entropy(model.apply({"params": params}, ids), labels)

    return loss


def adapted_for(method: str, params: dict, vera_r: int, lora_r: int) -> vera_jax.Adapted:
    if method in VERA_PATHS:
        return vera_jax.apply_vera(params, vera_jax.VeraConfig(r=vera_r, targets=TARGETS))
    if method == "lora":
        return vera_jax.apply_lora(params, vera_jax.LoraConfig(r=lora_r, alpha=lora_r, targets=TARGETS))
    if method == "full":
        return vera_jax.apply_full(params, trainable_extra=())
    raise ValueError(f"--methods: unknown method {method!r}; known: {list(METHODS)}")


def train_step(model: nn.Module, path: str, tx: optax.GradientTransformation) -> Callable:
    """(trainable, opt_state, frozen, ids, labels) -> (trainable, opt_state, loss)."""

    def step(trainable, opt_state, frozen, ids, labels):
        def loss(t):
            logits = vera_jax.apply_adapted(model, vera_jax.combine(t, frozen), ids, path=path)
            return cross_entropy(logits, labels)

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return step


def run_jax(cfg: dict, methods: list[str], batch: int, seq: int, iters: int, warmup: int, vera_r: int,
            lora_r: int, dtype: str) -> dict:
    """Every requested vera_jax method on one shape; keys are method names."""
    kind = cfg["model_type"]
    jdtype = jnp.dtype(dtype)
    model = hub.family(kind).build(cfg, dtype=jdtype, param_dtype=jdtype)
    ids, labels = make_batch(cfg, batch, seq)
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), ids[:1, :2]))["params"])()
    results = {}
    for method in methods:
        if method == "floor":
            embed_name = FAMILY[kind][0]
            hidden = cfg.get("hidden_size", cfg.get("n_embd"))
            eps = jnp.zeros((batch, seq, hidden), jdtype)
            grad = jax.value_and_grad(embedding_eps(model, embed_name), argnums=1)
            res = measure(grad, (params, eps, ids, labels), iters, warmup)
            res["trainable"] = 0
        else:
            adapted = adapted_for(method, params, vera_r, lora_r)
            trainable, frozen = vera_jax.partition(adapted)
            trainable = jax.tree.map(jnp.copy, trainable)  # donated below; keep `params` alive
            tx = optax.adamw(1e-4)
            step = train_step(model, VERA_PATHS.get(method, "merged" if method == "full" else "auto"), tx)
            res = measure(step, (trainable, tx.init(trainable), frozen, ids, labels), iters, warmup,
                          donate=(0, 1), carry=2)
            res["trainable"] = vera_jax.count_trainable(adapted)
        results[method] = res
    return results


# ---------------------------------------------------------------- PEFT


def run_peft(cfg: dict, batch: int, seq: int, iters: int, warmup: int, vera_r: int, lora_r: int,
             dtype: str) -> dict:
    """The floor, PEFT VeRA and PEFT LoRA in PyTorch; keys peft_floor, peft_vera, peft_lora."""
    import peft
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    kind = cfg["model_type"]
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    architecture = getattr(transformers, cfg["architectures"][0])
    ids_np, labels_np = make_batch(cfg, batch, seq)
    ids = torch.from_numpy(ids_np.astype(np.int64)).to(device)
    labels = torch.from_numpy(labels_np.astype(np.int64)).to(device)
    targets = FAMILY[kind][1]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def build():
        torch.manual_seed(0)
        return architecture(hf_cfg)

    def loss_of(model):
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def time_steps(step) -> dict:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(warmup + iters):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        peak = int(torch.cuda.max_memory_allocated()) if device == "cuda" else None
        timed = times[warmup:]
        return {"step_ms": 1e3 * statistics.median(timed), "first_step_s": times[0],
                "memory": {"device_peak": peak}}

    results = {}
    model = build().to(device=device, dtype=tdtype).eval()
    model.requires_grad_(False)
    embedding = {"roberta": lambda m: m.roberta.embeddings, "gpt2": lambda m: m.transformer.wte,
                 "llama": lambda m: m.model.embed_tokens}[kind](model)
    eps = torch.zeros(batch, seq, hf_cfg.hidden_size, dtype=tdtype, device=device, requires_grad=True)
    hook = embedding.register_forward_hook(lambda module, args, out: out + eps)

    def floor_step():
        eps.grad = None
        loss_of(model).backward()

    results["peft_floor"] = {**time_steps(floor_step), "trainable": 0}
    hook.remove()
    model = None  # free the floor model before the PEFT ones

    adapters = {
        "peft_vera": peft.VeraConfig(r=vera_r, target_modules=targets, d_initial=0.1, vera_dropout=0.0,
                                     fan_in_fan_out=kind == "gpt2"),
        "peft_lora": peft.LoraConfig(r=lora_r, lora_alpha=lora_r, target_modules=targets, lora_dropout=0.0,
                                     fan_in_fan_out=kind == "gpt2"),
    }
    for name, adapter_config in adapters.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(build(), adapter_config).to(device=device, dtype=tdtype).eval()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss_of(model).backward()
            optimizer.step()

        results[name] = {**time_steps(step), "trainable": sum(p.numel() for p in trainable)}
        del model, optimizer
    results["_device"] = f"torch {torch.__version__} {device}, {torch.get_num_threads()} threads"
    return results


# ---------------------------------------------------------------- report


def add_ratios(rows: dict, peft_rows: dict | None) -> None:
    """Ratios to the vera_jax floor (time, compile, memory) and, per method, to its PEFT twin."""
    floor = rows["floor"]
    floor_peak = floor["memory"].get("peak_estimate")
    for res in list(rows.values()) + list((peft_rows or {}).values()):
        res["step_vs_floor"] = res["step_ms"] / floor["step_ms"]
        if "compile_s" in res:
            res["compile_vs_floor"] = res["compile_s"] / floor["compile_s"]
        peak = res["memory"].get("peak_estimate")
        res["memory_vs_floor"] = peak / floor_peak if peak is not None and floor_peak else None
    if peft_rows:
        twin = {"floor": "peft_floor", "lora": "peft_lora", **{m: "peft_vera" for m in VERA_PATHS}}
        for method, res in rows.items():
            if twin.get(method) in peft_rows:
                res["step_vs_peft"] = res["step_ms"] / peft_rows[twin[method]]["step_ms"]


def check_targets(rows: dict, peft_rows: dict | None) -> list[dict]:
    """The issue's targets, evaluated on this run (they are stated for RoBERTa-base, VeRA
    r=1024 on query/value, >= 4096 tokens per step, CPU)."""
    checks = []
    vera = rows.get("vera_auto")
    if vera is None:
        return checks
    checks.append({"target": "vera_auto step <= 1.10x floor", "value": vera["step_vs_floor"],
                   "ok": vera["step_vs_floor"] <= 1.10})
    lora = rows.get("lora")
    if lora is not None:
        vp, lp = vera["memory"].get("peak_estimate"), lora["memory"].get("peak_estimate")
        if vp is not None and lp is not None:
            checks.append({"target": "vera_auto peak memory <= lora's", "value": vp / lp, "ok": vp <= lp})
        checks.append({"target": "vera_auto step <= lora's", "value": vera["step_ms"] / lora["step_ms"],
                       "ok": vera["step_ms"] <= lora["step_ms"]})
    if peft_rows and "step_vs_peft" in vera:
        checks.append({"target": "vera_auto step <= 0.7x PEFT VeRA's", "value": vera["step_vs_peft"],
                       "ok": vera["step_vs_peft"] <= 0.7})
    return checks


def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:.1f}"


def markdown(record: dict) -> str:
    s = record["shape"]
    lines = [
        f"### {s['model']} shape: {s['layers']} of {s['full_layers']} layers, hidden {s['hidden']}, "
        f"batch {s['batch']} x seq {s['seq']} = {s['tokens']} tokens/step, {s['dtype']}, VeRA r={s['vera_r']}, "
        f"LoRA r={s['lora_r']} (query, value)",
        "",
        f"{record['machine']['jax']}; load average {record['machine']['load_avg']} over "
        f"{record['machine']['cpus']} CPUs; median of {s['iters']} steps after {s['warmup']} warm-up",
        "",
    ]
    peft_rows = record.get("peft")
    header = ("| method | step ms | × floor | compile s | × floor | XLA peak MiB | × floor | XLA temp MiB "
              "| device peak MiB | trainable |")
    if peft_rows:
        header += " × PEFT |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for method, r in record["methods"].items():
        row = (f"| {method} | {r['step_ms']:.2f} | {r['step_vs_floor']:.3f} | {r['compile_s']:.2f} | "
               f"{r['compile_vs_floor']:.2f} | {_mib(r['memory'].get('peak_estimate'))} | "
               f"{_f(r['memory_vs_floor'], '.3f')} | {_mib(r['memory'].get('temp'))} | "
               f"{_mib(r['memory'].get('device_peak'))} | {r['trainable']:,} |")
        if peft_rows:
            row += f" {_f(r.get('step_vs_peft'), '.3f')} |"
        lines.append(row)
    if peft_rows:
        for name, r in peft_rows.items():
            lines.append(f"| {name} | {r['step_ms']:.2f} | {r['step_vs_floor']:.3f} | {r['first_step_s']:.2f} "
                         f"(1st step) | – | – | – | – | {_mib(r['memory'].get('device_peak'))} | "
                         f"{r['trainable']:,} | – |")
        lines += ["", f"PEFT: {record['peft_device']}."]
    if record["checks"]:
        lines += ["", "Targets (issue 8; stated for RoBERTa-base, r=1024, >= 4096 tokens):"]
        lines += [f"- {c['target']}: {c['value']:.3f} {'ok' if c['ok'] else 'MISSED'}" for c in record["checks"]]
    return "\n".join(lines)


def machine() -> dict:
    return {"load_avg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "jax": f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})"}


# ---------------------------------------------------------------- crossover


class OneLayer(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, name="dense")(x)


def crossover(width: int, ranks: list[int], tokens_list: list[int], iters: int, warmup: int, dtype: str) -> list[dict]:
    """Merged vs factored gradient step of one adapted (width, width) Dense, against the cost model."""
    jdtype = jnp.dtype(dtype)
    model = OneLayer(width)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, width), jdtype)))["params"]
    params = jax.tree.map(lambda p: p.astype(jdtype), params)
    rows = []
    for r in ranks:
        adapted = vera_jax.apply_vera(params, vera_jax.VeraConfig(r=r, targets=("dense",), d_initial=0.1))
        trainable, frozen = vera_jax.partition(adapted)
        for tokens in tokens_list:
            x = jax.random.normal(jax.random.key(1), (tokens, width), jdtype)
            floor = measure(jax.grad(lambda x: jnp.mean(model.apply({"params": params}, x).astype(jnp.float32) ** 2)),
                            (x,), iters, warmup)
            row = {"r": r, "tokens": tokens, "width": width, "floor_ms": floor["step_ms"]}
            for path in ("merged", "factored"):
                def loss(t, x, path=path):
                    y = vera_jax.apply_adapted(model, vera_jax.combine(t, frozen), x, path=path)
                    return jnp.mean(y.astype(jnp.float32) ** 2)

                row[f"{path}_ms"] = measure(jax.grad(loss, argnums=(0, 1)), (trainable, x), iters, warmup)["step_ms"]
            costs = vera_jax.layer_costs(tokens, width, width, r)
            row["measured"] = "merged" if row["merged_ms"] <= row["factored_ms"] else "factored"
            row["predicted"] = vera_jax.choose_path(tokens, width, width, r)
            row["measured_ratio"] = row["merged_ms"] / row["factored_ms"]
            row["predicted_ratio"] = costs["merged"] / costs["factored"]
            rows.append(row)
    return rows


def predicted_crossover_tokens(width: int, r: int) -> int | None:
    """Fewest tokens from which the cost model picks merged for a VeRA (width, width) layer."""
    # merged <= factored  <=>  tokens * (4 r w - w^2) >= 3 w^2 r  (square layer, k = 2)
    slope = 4 * r * width - width * width
    return None if slope <= 0 else math.ceil(3 * width * width * r / slope)


def crossover_markdown(record: dict) -> str:
    lines = [f"### crossover: one VeRA Dense ({record['width']} x {record['width']}), gradient step "
             f"w.r.t. d, b and the input, {record['dtype']}",
             "",
             f"{record['machine']['jax']}; load average {record['machine']['load_avg']} over "
             f"{record['machine']['cpus']} CPUs; median of {record['iters']} after {record['warmup']} warm-up",
             "",
             "| r | tokens | frozen ms | merged ms | factored ms | merged/factored measured | predicted "
             "| faster measured | predicted | agree |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in record["rows"]:
        lines.append(f"| {x['r']} | {x['tokens']} | {x['floor_ms']:.3f} | {x['merged_ms']:.3f} | "
                     f"{x['factored_ms']:.3f} | {x['measured_ratio']:.2f} | {x['predicted_ratio']:.2f} | "
                     f"{x['measured']} | {x['predicted']} | {'yes' if x['measured'] == x['predicted'] else 'NO'} |")
    lines += ["", "Cost-model crossover (merged from this many tokens on): "
              + ", ".join(f"r={r}: {'never' if t is None else t}" for r, t in record["predicted_crossover"].items())]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="roberta-base", choices=sorted(PAPER_RANK))
    p.add_argument("--layers", type=int, help="override the depth (the table says how many ran)")
    p.add_argument("--hidden", type=int, help="override the width (MLP and heads follow); for quick checks")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {','.join(METHODS)}")
    p.add_argument("--vera_r", type=int, help="VeRA rank (default: the paper's for the model)")
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--against", choices=["peft"], help="also run HF PEFT (PyTorch) on the same shapes")
    p.add_argument("--crossover", action="store_true", help="one-layer merged vs factored sweep instead")
    p.add_argument("--crossover_ranks", type=_ints, default=[16, 64, 256, 1024, 4096])
    p.add_argument("--crossover_tokens", type=_ints, default=[64, 256, 1024, 4096, 16384])
    p.add_argument("--json", help="also write the JSON record here")
    args = p.parse_args(argv)
    for name in ("batch", "seq", "iters", "lora_r"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup: expected >= 0, got {args.warmup}")
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; known: {list(METHODS)}")
    args.methods = ["floor"] + [m for m in METHODS if m in methods and m != "floor"]
    args.vera_r = args.vera_r or PAPER_RANK[args.model]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    cfg = model_config(args.model, args.layers, args.hidden)
    if args.crossover:
        width = shape_summary(cfg, args.model)["hidden"]
        record = {"mode": "crossover", "model": args.model, "width": width, "dtype": args.dtype,
                  "iters": args.iters, "warmup": args.warmup,
                  "rows": crossover(width, args.crossover_ranks, args.crossover_tokens, args.iters, args.warmup,
                                    args.dtype),
                  "predicted_crossover": {str(r): predicted_crossover_tokens(width, r) for r in args.crossover_ranks}}
        record["machine"] = machine()
        text = crossover_markdown(record)
    else:
        shape = {**shape_summary(cfg, args.model), "batch": args.batch, "seq": args.seq,
                 "tokens": args.batch * args.seq, "dtype": args.dtype, "vera_r": args.vera_r,
                 "lora_r": args.lora_r, "iters": args.iters, "warmup": args.warmup}
        rows = run_jax(cfg, args.methods, args.batch, args.seq, args.iters, args.warmup, args.vera_r, args.lora_r,
                       args.dtype)
        record = {"mode": "benchmark", "shape": shape, "methods": rows}
        if args.against == "peft":
            peft_rows = run_peft(cfg, args.batch, args.seq, args.iters, args.warmup, args.vera_r, args.lora_r,
                                 args.dtype)
            record["peft_device"] = peft_rows.pop("_device")
            record["peft"] = peft_rows
        add_ratios(rows, record.get("peft"))
        record["checks"] = check_targets(rows, record.get("peft"))
        record["machine"] = machine()
        text = markdown(record)
    print(text)
    line = json.dumps(record)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    print(line)
    sys.stdout.flush()
    return record


if __name__ == "__main__":
    main()
