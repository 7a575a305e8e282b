"""Peak host memory of loading a multi-shard LLaMA checkpoint into a quantized base, old path vs streamed.

    python -m experiments.load_memory                      # default: 8 layers, ~1.3 GB float32, 6 shards
    python -m experiments.load_memory --layers 4 --dtype bfloat16 --quantize int8

Writes (or reuses, under --workdir) a LLaMA-shaped checkpoint of random weights as Hugging Face
shards it (config.json, model-0000k-of-0000n.safetensors, model.safetensors.index.json), then loads
it once per mode, each in a fresh Python process so one mode's allocations cannot hide the
other's, and prints one JSON line:

  full:     `hub.from_pretrained` then `quant.quantize_params` (what the runner did before): every
            shard read whole, the float tree cast to float32, then quantized.
  streamed: the model loader (`loader.load_model`, model.quantize=...): one tensor read, cast,
            quantized and placed at a time (see `vera_jax.models.hub`).

Per mode: the child's peak RSS (`peak_rss`: VmHWM, the peak `getrusage` would report were it not
inherited across exec) and the same figure right after the imports and JAX's start, so
`load_peak_bytes` (the difference) is what loading added; the load's wall time; the loaded tree's
bytes (`quant.param_bytes`).

Measured on 2 shared CPU cores (hidden 1536, intermediate 4096, vocab 32000, float32 shards of
<= 256 MiB, NF4; load_peak_bytes in MiB):

    layers  float32 checkpoint  full   streamed  loaded tree (NF4 layers + float32 embed/lm_head)
    4        807                1635    820       431
    8       1239                2500    827       487
    16      2103                4230   1021       598

full is twice the float32 model (the tensors as read, plus their float32 copies, alive together
before quantization starts): +216 MiB per layer of 108 MiB float32. streamed is the loaded tree
plus 340-420 MiB, about twice the largest tensor (the 188 MiB embedding, read, then copied to the
device), and grows by +17 MiB per layer (a layer's NF4 kernels are 14 MiB). On a
CPU-only machine JAX's device memory is host memory, so streamed's figure includes the quantized
model itself; on an accelerator its host peak is the tensor in flight.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("full", "streamed")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("nf4", "int8")
NF4_BLOCK = 64


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int,
                 dtype: str) -> dict:
    """An HF LlamaForCausalLM config.json of the given shape (untied lm_head, as LLaMA 7B/13B)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": dtype}


def check_shape(layers: int, hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int) -> None:
    """Refuses, naming the flag, a shape the model or NF4 (blocks of 64 inputs) cannot take."""
    for name, value in [("layers", layers), ("hidden", hidden), ("intermediate", intermediate), ("vocab", vocab),
                        ("heads", heads), ("kv_heads", kv_heads)]:
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    if hidden % heads:
        raise ValueError(f"--hidden {hidden}: must be a multiple of --heads {heads}")
    if heads % kv_heads:
        raise ValueError(f"--heads {heads}: must be a multiple of --kv-heads {kv_heads}")
    for name, value in [("hidden", hidden), ("intermediate", intermediate)]:
        if value % NF4_BLOCK:
            raise ValueError(f"--{name} {value}: must be a multiple of {NF4_BLOCK} (NF4 quantizes blocks of "
                             f"{NF4_BLOCK} inputs)")


def _tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and (out, in) shapes, in the order HF shards them (layer by layer)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_checkpoint(directory: str, *, layers: int, hidden: int, intermediate: int, vocab: int, heads: int,
                     kv_heads: int | None = None, dtype: str = "float32", shard_mb: float = 256,
                     seed: int = 0) -> dict:
    """A random LLaMA checkpoint in `directory`, sharded as HF does (a shard is closed before it
    passes `shard_mb`), written one shard at a time; reused when `directory` already holds one of
    the same config (config.json is written last, so a half-written one is redone). Returns its
    facts: parameters, bytes as stored, bytes in float32, shards, largest tensor."""
    from safetensors.numpy import save_file

    kv_heads = kv_heads or heads
    check_shape(layers, hidden, intermediate, vocab, heads, kv_heads)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {list(DTYPES)}")
    if shard_mb <= 0:
        raise ValueError(f"--shard-mb {shard_mb}: must be positive")
    config = llama_config(layers, hidden, intermediate, vocab, heads, kv_heads, dtype)
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    shapes = _tensor_shapes(config)
    params = sum(math.prod(s) for _, s in shapes)
    facts = {"directory": directory, "layers": layers, "hidden": hidden, "intermediate": intermediate,
             "vocab": vocab, "dtype": dtype, "params": params, "stored_bytes": params * np_dtype.itemsize,
             "float32_bytes": params * 4, "largest_tensor_float32_bytes": max(math.prod(s) for _, s in shapes) * 4}
    config_file = os.path.join(directory, "config.json")
    index_file = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(config_file) and os.path.exists(index_file):
        with open(config_file) as f:
            if json.load(f) == config:
                with open(index_file) as g:
                    facts["shards"] = len(set(json.load(g)["weight_map"].values()))
                return {**facts, "reused": True}
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(config_file):
        os.remove(config_file)
    limit = shard_mb * 2**20
    groups, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * np_dtype.itemsize
        if current and size + nbytes > limit:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    groups.append(current)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                value = np.ones(shape, np.float32)
            else:
                value = rng.standard_normal(shape, dtype=np.float32)
                value *= 0.02
            tensors[name] = value.astype(np_dtype, copy=False)
            weight_map[name] = file
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        del tensors
    with open(index_file, "w") as f:
        json.dump({"metadata": {"total_size": facts["stored_bytes"]}, "weight_map": weight_map}, f, indent=2)
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2)
    return {**facts, "shards": len(groups), "reused": False}


def peak_rss() -> int:
    """This process's peak resident set so far, in bytes: Linux's VmHWM (/proc/self/status), else
    `getrusage(RUSAGE_SELF).ru_maxrss`. Not ru_maxrss on Linux: it survives exec, so a child
    started by subprocess (vfork + exec) reports at least its parent's peak, e.g. the parent's
    ~0.5 GB after writing a checkpoint, which hid the child's own figure after its imports."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def load(checkpoint: str, mode: str, method: str) -> dict:
    """Loads `checkpoint` quantized by `method` the `mode` way in this process and measures it
    (meant for a fresh process: peak RSS is the process's whole life)."""
    import jax
    import jax.numpy as jnp

    from vera_jax import quant
    from vera_jax.models import hub, loader

    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {list(MODES)}")
    if method not in QUANTIZE:
        raise ValueError(f"--quantize {method!r}: expected one of {list(QUANTIZE)}")
    jnp.zeros(()).block_until_ready()  # JAX's backend started before the baseline
    baseline = peak_rss()
    start = time.perf_counter()
    if mode == "full":
        _, params, _ = hub.from_pretrained(checkpoint)
        params = quant.quantize_params(params, method)
    else:
        params = loader.load_model(loader.ModelSpec(checkpoint, quantize=method)).params
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    sizes = quant.param_bytes(params)
    return {"mode": mode, "quantize": method, "backend": jax.default_backend(), "load_s": round(seconds, 2),
            "peak_rss_bytes": peak, "rss_after_imports_bytes": baseline, "load_peak_bytes": peak - baseline,
            "loaded_bytes": sizes["bytes"], "quantized_kernel_bytes": sizes["quantized_bytes"],
            "params": sizes["params"]}


def measure(checkpoint: str, mode: str, method: str = "nf4", timeout: float = 1800) -> dict:
    """`load` in a fresh Python process (the environment's JAX_PLATFORMS and XLA_FLAGS kept)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "experiments.load_memory", "--child", mode,
                           "--checkpoint", checkpoint, "--quantize", method],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"load_memory child ({mode}) failed with exit code {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.load_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/vera_load_memory", help="where checkpoints are written and reused")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (LLaMA 7B/13B)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the checkpoint's stored dtype")
    parser.add_argument("--shard-mb", type=float, default=256, help="largest shard, MiB (HF's max_shard_size)")
    parser.add_argument("--quantize", choices=QUANTIZE, default="nf4")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)}")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        out = load(args.checkpoint, args.child, args.quantize)
        print(json.dumps(out))
        return out
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        parser.error(f"--modes {args.modes!r}: expected a comma-separated list of {list(MODES)}")
    name = (f"llama-L{args.layers}-H{args.hidden}-I{args.intermediate}-V{args.vocab}-A{args.heads}"
            f"-KV{args.kv_heads or args.heads}-{args.dtype}-S{args.shard_mb:g}")
    try:
        facts = write_checkpoint(os.path.join(args.workdir, name), layers=args.layers, hidden=args.hidden,
                                 intermediate=args.intermediate, vocab=args.vocab, heads=args.heads,
                                 kv_heads=args.kv_heads, dtype=args.dtype, shard_mb=args.shard_mb)
    except ValueError as e:
        parser.error(str(e))
    out = {"checkpoint": facts, "quantize": args.quantize}
    for mode in modes:
        out[mode] = measure(facts["directory"], mode, args.quantize)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
