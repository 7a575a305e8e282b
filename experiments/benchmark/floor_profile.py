"""Where the frozen model's step time goes on this machine, JAX beside PyTorch (`--floor_profile`).

The floor (forward + backward of the frozen encoder) is what every method's step sits on, so a
backend's handicap there shows up in every ratio against PEFT. This times the parts of one
encoder layer at the benchmark's shape, each as its own forward + backward, in JAX and in torch
(same shapes, same dtype, torch with every CPU thread), interleaved round by round so a load
spike lands on both:

- `projections`: the four (hidden x hidden) attention matmuls;
- `mlp_matmuls`: the (hidden x 4 hidden) and (4 hidden x hidden) matmuls;
- `attention_core`: scores, softmax and context, as the zoo writes them (`common.Attention`);
- `attention_fused`: the same through `jax.nn.dot_product_attention` (torch: `scaled_dot_product_attention`);
- `layer_norms`: the block's two LayerNorms;
- `gelu`: the exact (erf) GELU of BERT/RoBERTa on the MLP's hidden activations;
- `layer`: the whole layer (the sum of the parts plus the residual adds and the fusion XLA finds).

XLA's own options (`XLA_FLAGS`) act at process start, so comparing them means running this once
per setting; the record carries the flags it ran with.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from .shapes import hidden_size, model_config
from .timing import machine

PARTS = ("projections", "mlp_matmuls", "attention_core", "attention_fused", "layer_norms", "gelu", "layer")


def _sum_squares(outs):
    """The scalar each part is differentiated through; separate outputs stay separate (a sum of
    matmuls sharing an input would let XLA merge them into one)."""
    return sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in (outs if isinstance(outs, tuple) else (outs,)))


def _inputs(batch: int, seq: int, d: int) -> dict:
    """The same random inputs and weights (numpy, float32) for both frameworks."""
    rng = np.random.default_rng(0)
    shapes = {"x": (batch, seq, d), "h": (batch, seq, 4 * d), "wq": (d, d), "wk": (d, d), "wv": (d, d),
              "wo": (d, d), "w1": (d, 4 * d), "w2": (4 * d, d)}
    return {k: rng.standard_normal(v, dtype=np.float32) * (1.0 if k in ("x", "h") else 0.05)
            for k, v in shapes.items()}


def _jax_parts(inputs: dict, heads: int, dtype) -> dict:
    """Part name -> a call returning d(sum of squares of the part's outputs)/d(its input)."""
    a = {k: jnp.asarray(v, dtype) for k, v in inputs.items()}
    batch, seq, d = inputs["x"].shape
    hd = d // heads
    x, h, wq, wk, wv, wo, w1, w2 = (a[k] for k in ("x", "h", "wq", "wk", "wv", "wo", "w1", "w2"))

    def ln(t):
        mu = t.mean(-1, keepdims=True)
        var = ((t - mu) ** 2).mean(-1, keepdims=True)
        return (t - mu) * jax.lax.rsqrt(var + 1e-5)

    def split(t):
        return t.reshape(batch, seq, heads, hd)

    def core(q, k, v):  # as common.Attention writes it
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(hd)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)

    def layer(t):
        q, k, v = split(t @ wq), split(t @ wk), split(t @ wv)
        t = ln(t + core(q, k, v).reshape(t.shape) @ wo)
        return ln(t + jax.nn.gelu(t @ w1, approximate=False) @ w2)

    q4 = split(x)
    fns = {
        "projections": (lambda t: (t @ wq, t @ wk, t @ wv, t @ wo), x),
        "mlp_matmuls": (lambda t: (t @ w1) @ w2, x),
        "attention_core": (lambda t: core(t, t, t), q4),
        "attention_fused": (lambda t: jax.nn.dot_product_attention(t, t, t, implementation="xla"), q4),
        "layer_norms": (lambda t: ln(ln(t)), x),
        "gelu": (lambda t: jax.nn.gelu(t, approximate=False), h),
        "layer": (layer, x),
    }
    out = {}
    for name, (fn, arg) in fns.items():
        step = jax.jit(jax.grad(lambda t, fn=fn: _sum_squares(fn(t))))
        jax.block_until_ready(step(arg))  # compile outside the timed rounds
        out[name] = (lambda step=step, arg=arg: jax.block_until_ready(step(arg)))
    return out


def _torch_parts(inputs: dict, heads: int, dtype: str) -> dict:
    """`_jax_parts` in torch, on the same inputs."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count())
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    a = {k: torch.from_numpy(v).to(tdtype) for k, v in inputs.items()}
    batch, seq, d = inputs["x"].shape
    hd = d // heads
    x, h, wq, wk, wv, wo, w1, w2 = (a[k] for k in ("x", "h", "wq", "wk", "wv", "wo", "w1", "w2"))

    def ln(t):
        return F.layer_norm(t, (d,), eps=1e-5)

    def split(t):
        return t.reshape(batch, seq, heads, hd)

    def core(q, k, v):
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k).float() / np.sqrt(hd)
        return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1).to(tdtype), v)

    def fused(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    def layer(t):
        q, k, v = split(t @ wq), split(t @ wk), split(t @ wv)
        t = ln(t + core(q, k, v).reshape(t.shape) @ wo)
        return ln(t + F.gelu(t @ w1) @ w2)

    q4 = split(x).clone()
    fns = {
        "projections": (lambda t: (t @ wq, t @ wk, t @ wv, t @ wo), x),
        "mlp_matmuls": (lambda t: (t @ w1) @ w2, x),
        "attention_core": (lambda t: core(t, t, t), q4),
        "attention_fused": (lambda t: fused(t, t, t), q4),
        "layer_norms": (lambda t: ln(ln(t)), x),
        "gelu": (lambda t: F.gelu(t), h),
        "layer": (layer, x),
    }

    def run(fn, arg):
        arg = arg.detach().requires_grad_(True)
        outs = fn(arg)
        sum((o.float() ** 2).sum() for o in (outs if isinstance(outs, tuple) else (outs,))).backward()
        return arg.grad

    return {name: (lambda fn=fn, arg=arg: run(fn, arg)) for name, (fn, arg) in fns.items()}


def part_calls(d: int, heads: int, batch: int, seq: int, dtype: str, against_torch: bool) -> dict:
    """"jax/<part>" (and "torch/<part>") -> a call computing that part's input gradient, for width
    `d` and `heads` attention heads."""
    inputs = _inputs(batch, seq, d)
    calls = {f"jax/{k}": v for k, v in _jax_parts(inputs, heads, jnp.dtype(dtype)).items()}
    if against_torch:
        calls.update({f"torch/{k}": v for k, v in _torch_parts(inputs, heads, dtype).items()})
    return calls


def floor_profile_record(model: str, hidden: int | None, batch: int, seq: int, iters: int, warmup: int,
                         dtype: str, against_torch: bool = True) -> dict:
    """Median ms per part (forward + backward) in JAX and, when asked, torch; their ratios."""
    cfg = model_config(model, None, hidden)
    d, heads = hidden_size(cfg), int(cfg["num_attention_heads"])
    calls = part_calls(d, heads, batch, seq, dtype, against_torch)
    times: dict[str, list] = {name: [] for name in calls}
    for i in range(warmup + iters):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    rows = []
    for part in PARTS:
        row = {"part": part, "jax_ms": 1e3 * statistics.median(times[f"jax/{part}"])}
        if against_torch:
            row["torch_ms"] = 1e3 * statistics.median(times[f"torch/{part}"])
            row["jax_over_torch"] = row["jax_ms"] / row["torch_ms"]
        rows.append(row)
    return {"benchmark": "floor_profile", "model": model, "hidden": d, "heads": heads, "batch": batch, "seq": seq,
            "dtype": dtype, "iters": iters, "warmup": warmup, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "machine": machine(), "rows": rows}


def floor_profile_markdown(record: dict) -> str:
    m = record["machine"]
    lines = [f"{record['model']} layer parts, hidden {record['hidden']}, {record['batch']} x {record['seq']} tokens, "
             f"{record['dtype']}, forward + backward, median of {record['iters']}; {m['jax']}; load average "
             f"{m['load_avg']} over {m['cpus']} CPUs; XLA_FLAGS={record['xla_flags'] or '(none)'}", "",
             "| part | JAX ms | torch ms | JAX / torch |", "|---|---:|---:|---:|"]
    for row in record["rows"]:
        torch_ms = f"{row['torch_ms']:.2f}" if "torch_ms" in row else "–"
        ratio = f"{row['jax_over_torch']:.3f}" if "jax_over_torch" in row else "–"
        lines.append(f"| {row['part']} | {row['jax_ms']:.2f} | {torch_ms} | {ratio} |")
    return "\n".join(lines)
