"""Memory of a causal LM's training gradient with the loss from all logits vs chunked
(`model.loss_chunk`, `vera_jax.train.losses`): a small LLaMA with a large vocabulary (Gemma 3's
262,144 by default), so the logits dominate, as they do for Gemma 3 270M.

    python -m experiments.loss_memory                               # vocab 262144, batch 8 x 128
    python -m experiments.loss_memory --vocab 32000 --chunks 0,64,1024

Per chunk setting (0: all logits), each in a fresh process: XLA's planned temporary buffers of
the jitted gradient (`temp_bytes`, from `compiled.memory_analysis()`, on every platform), the
device's peak bytes in use after one step where the platform reports it (GPU/TPU; None on CPU),
the full logits' float32 bytes for scale, and the loss (equal across settings). The gradient is
taken with respect to the transformer layers (what an adapter's gradient passes through); the
embedding and LM head are frozen inputs, as in VeRA/LoRA training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure_one(*, vocab: int, width: int, layers: int, batch: int, seq: int, chunk: int, dtype: str = "float32",
                seed: int = 0) -> dict:
    """One setting's record (see the module docstring), in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vera_jax.models import llama
    from vera_jax.tasks import causal_lm

    hf = {"model_type": "llama", "vocab_size": vocab, "hidden_size": width, "intermediate_size": 2 * width,
          "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 4,
          "max_position_embeddings": max(seq, 128), "tie_word_embeddings": False}
    module = llama.build(hf, dtype=jnp.dtype(dtype))
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, seq)), jnp.int32)
    params = jax.jit(module.init)(jax.random.key(seed), ids[:1])["params"]
    trunk = {k: v for k, v in params.items() if k.startswith("layer_")}
    frozen = {k: v for k, v in params.items() if not k.startswith("layer_")}
    data = {"ids": ids, "mask": jnp.ones_like(ids), "weights": jnp.ones_like(ids)}

    def loss(trunk, frozen, data):
        return causal_lm.shifted_loss_of(module, {**frozen, **trunk}, data, chunk=chunk)

    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(trunk, frozen, data).compile()
    analysis = compiled.memory_analysis()
    value, grads = compiled(trunk, frozen, data)
    jax.block_until_ready(grads)
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"chunk": chunk, "temp_bytes": int(analysis.temp_size_in_bytes) if analysis is not None else None,
            "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "logits_bytes": batch * seq * vocab * 4,
            "loss": float(value), "platform": jax.devices()[0].platform}


def measure(*, vocab: int, width: int, layers: int, batch: int, seq: int, chunks=(0, 256), dtype: str = "float32",
            fresh_process: bool = False) -> dict:
    """Records for every chunk setting; with fresh_process, each in its own Python process (so a
    device's peak-memory counter starts from zero)."""
    shape = dict(vocab=vocab, width=width, layers=layers, batch=batch, seq=seq, dtype=dtype)
    runs = []
    for chunk in chunks:
        if not fresh_process:
            runs.append(measure_one(chunk=chunk, **shape))
            continue
        args = [sys.executable, "-m", "experiments.loss_memory", "--child", "--chunks", str(chunk)] + [
            f"--{k}={v}" for k, v in shape.items()]
        out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {**shape, "runs": runs}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=262144, help="vocabulary (Gemma 3: 262144)")
    parser.add_argument("--width", type=int, default=64, help="hidden size")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--chunks", default="0,256", help="comma-separated loss_chunk values (0: all logits)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    chunks = [int(x) for x in a.chunks.split(",")]
    if any(c < 0 for c in chunks) or min(a.vocab, a.width, a.layers, a.batch, a.seq) < 1 or a.width % 4:
        parser.error("--chunks must be >= 0; vocab, width (a multiple of 4), layers, batch, seq >= 1")
    shape = dict(vocab=a.vocab, width=a.width, layers=a.layers, batch=a.batch, seq=a.seq, dtype=a.dtype)
    if a.child:
        print(json.dumps(measure_one(chunk=chunks[0], **shape)))
        return
    print(json.dumps(measure(chunks=chunks, fresh_process=True, **shape)))


if __name__ == "__main__":
    main()
