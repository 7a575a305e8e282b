"""Roofline cost model of one decode step of `experiments.serving_bench`, per row kind.

Why: the FLOP-only model predicts VeRA/merged = base / (base + adapter) FLOPs (0.94x at r=256,
0.78x at r=1024 on GPT-2-medium query/value), but a batched decode step at these shapes is not
FLOP-bound: every step reads every weight and the whole KV cache, and the adapter's extra FLOPs
hide under that memory traffic. So this model counts bytes moved as well as FLOPs, op by op, and
predicts a step as

    step_s = sum over ops of max(op FLOPs / peak_flops, op bytes / peak_bandwidth)

i.e. the roofline applied to each kernel and the kernels run one after another (a decode step is a
chain of dependent kernels, so one kernel's memory time cannot hide another's math). When every op
is bound by the same resource (batch 64 on an H200: all memory-bound) this equals the whole-step
max(FLOPs / peak, bytes / bandwidth); when some ops are compute-bound and others memory-bound (large
batches) the per-op sum is the honest one, since the whole-step max would assume a perfect overlap
nothing here provides.

What is counted (B rows, 1 new token each, S cache slots, p bytes per element of the model dtype):
  merged   every weight read once in its dtype (matmul kernels, biases, norms, the tied LM head);
           the KV cache (2 L B S width p) crossing memory `cache_passes` times: the attention reads
           every slot (masked or not), and the benchmark's step neither donates its cache nor writes
           all rows at one index, so XLA copies each layer's K and V (read + write) before scattering
           the new token in place: 3 passes on GPU (the H200's optimized HLO of this step holds exactly
           one copy and one in-place scatter per layer's K and V, and no transpose); 5 on CPU, whose
           HLO also transposes each scattered K and V (read + write) for its dots. `cache_passes`
           overrides it (a serving engine that donates its cache and attends in place reads it once);
           activations: each matmul's input read and output written, the f32 attention scores and
           probabilities (B H S each), elementwise chains (norms, GELU, residual adds) as one read
           and one write of their tensors, the logits written and re-read by the argmax.
  vera     merged + per targeted layer: the shared A_l (r, in) and B_l (out, r), read once per step
           whatever the batch holds (float32); x re-read; the (B, r) hidden written and re-read; each
           row's gathered d (r) and b (out) read once (XLA:CPU fuses the gather into the elementwise
           multiply; B (r + out) floats a layer, negligible either way); the (B, out) term written,
           re-read and added.
  lora     merged + per targeted layer: the distinct adapters' A_i (r, in) and B_i (out, r) read from
           the stacks (rows repeated in the batch come from cache, so HBM traffic grows with distinct
           adapters, not rows); hidden and term as for VeRA. Where the gathered (B, r, in) and
           (B, out, r) copies go depends on the backend, as read in XLA's optimized HLO of this step:
           on GPU (H200, jax 0.11.2) the gather is fused into the reduction that computes each row's
           matvec, so nothing more moves; on CPU (jax 0.10.2) it is a separate fusion whose output the
           dot reads, so the copies are also written and re-read (`gathers_materialized`).
FLOPs: 2 per multiply-add of every matmul, the attention over all S slots it computes (elementwise
FLOPs are left out: memory-bound ops whose time is their bytes). These are the same matmul FLOPs
the FLOP-only model counts, except that attention is counted over the S allocated slots the kernel
computes rather than the context it reads meaningfully.

Peaks: `KNOWN_PEAKS` per `jax.devices()[0].device_kind` (NVIDIA datasheet figures, dense, i.e.
half of the "with sparsity" Tensor Core numbers), or flags, or for a device it does not know
(this project's CPU box) a quick matmul and copy measured at startup, stated in the record.
"""

from __future__ import annotations

import dataclasses
import time

# NVIDIA datasheet figures (SXM parts), dense. float32 matmuls under JAX's default precision run on
# the Tensor Cores as TF32 on Ampere and later (JAX "Matmul precision" docs; on this project's H200
# an 8192^3 float32 matmul ran at 370-400 TFLOP/s by default and 50 with precision="highest"), so
# "float32" is the TF32 Tensor Core peak (datasheet 989 TFLOP/s with sparsity -> 494.5 dense);
# strict FP32 is 67 TFLOP/s: pass --peak_flops=67e12 for it. The same H200 streamed 3.0-3.4 TB/s
# (a 1-2 GiB read + write), under the 4.8 datasheet: with datasheet peaks the predicted step is
# that much too short, but a ratio of two memory-bound steps is a ratio of bytes, whatever the
# bandwidth; --calibrate measures the peaks instead.
KNOWN_PEAKS = {
    "NVIDIA H200": {"flops": {"float32": 494.5e12, "bfloat16": 989.5e12, "float16": 989.5e12},
                    "bandwidth": 4.8e12,
                    "source": "NVIDIA H200 SXM datasheet: TF32 989 / BF16 1,979 TFLOP/s with sparsity (dense = half), "
                              "HBM3e 4.8 TB/s"},
    "NVIDIA H100 80GB HBM3": {"flops": {"float32": 494.5e12, "bfloat16": 989.5e12, "float16": 989.5e12},
                              "bandwidth": 3.35e12,
                              "source": "NVIDIA H100 SXM datasheet: TF32 989 / BF16 1,979 TFLOP/s with sparsity "
                                        "(dense = half), HBM3 3.35 TB/s"},
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAPTER_BYTES = 4  # the benchmark's adapter arrays (A, B, d, b, LoRA stacks) are float32
SCORE_BYTES = 4  # attention scores are softmaxed in float32 (`decoding.attend`)
# KV-cache passes per step: attention read + the non-donated cache's copy (read + write), and on CPU
# the transposed copy its dots read (read + write); see the module doc.
CACHE_PASSES = {"gpu": 3, "cpu": 5}


@dataclasses.dataclass(frozen=True)
class Peaks:
    """What one device sustains at best: matmul FLOP/s at the run's dtype, and memory bytes/s."""

    flops: float
    bandwidth: float
    source: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Op:
    """One kernel of the step: its FLOPs and the bytes it moves to and from device memory."""

    name: str
    flops: float
    bytes: float


def known_peaks(device_kind: str, dtype: str) -> Peaks | None:
    """The datasheet peaks for `device_kind` at `dtype`, or None when this table does not know it."""
    entry = KNOWN_PEAKS.get(device_kind)
    if entry is None or dtype not in entry["flops"]:
        return None
    return Peaks(entry["flops"][dtype], entry["bandwidth"], entry["source"] + f"; {dtype} matmul peak")


def calibrate(matmul_n: int | None = None, stream_bytes: int | None = None, repeats: int = 5) -> Peaks:
    """Measured peaks of the local device: best of `repeats` of an (n, n) float32 matmul (at JAX's
    default precision, as the benchmark's matmuls run) and of a streaming elementwise op that reads
    and writes `stream_bytes` each. Sizes default to what one launch needs to run well past its
    overhead: n=1024 and 64 MiB on a CPU, n=8192 and 1 GiB on an accelerator. Used for devices
    without datasheet figures here (a CPU): on a shared machine these are the rates its steps see
    too, not the hardware's."""
    import jax
    import jax.numpy as jnp

    cpu = jax.devices()[0].platform == "cpu"
    matmul_n = matmul_n or (1024 if cpu else 8192)
    stream_bytes = stream_bytes or (1 << 26 if cpu else 1 << 30)
    a = jnp.ones((matmul_n, matmul_n), jnp.float32)
    x = jnp.ones((stream_bytes // 4,), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    stream = jax.jit(lambda x: x * 1.0001 + 1.0)

    def best(fn, arg):
        fn(arg).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(arg).block_until_ready()
            times.append(time.perf_counter() - start)
        return min(times)

    flops = 2.0 * matmul_n ** 3 / best(matmul, a)
    bandwidth = 2.0 * stream_bytes / best(stream, x)
    return Peaks(flops, bandwidth, f"measured at startup on {jax.devices()[0].device_kind}: best of {repeats} "
                                   f"{matmul_n}x{matmul_n} float32 matmuls and of a {stream_bytes >> 20} MiB "
                                   "read + write stream")


def model_dims(cfg: dict) -> dict:
    """The widths the cost model needs from a GPT-2 config."""
    width = cfg["n_embd"]
    return {"width": width, "inner": cfg.get("n_inner") or 4 * width, "layers": cfg["n_layer"],
            "vocab": cfg["vocab_size"], "heads": cfg["n_head"]}


def target_shapes(cfg: dict, targets) -> list[tuple[int, int]]:
    """(in_features, out_features) of every targeted GPT-2 Dense, one per layer per target; the same
    shapes `find_targets` returns for the built model (a test holds the two together)."""
    d = model_dims(cfg)
    shapes = {"query": (d["width"], d["width"]), "key": (d["width"], d["width"]),
              "value": (d["width"], d["width"]), "attn_out": (d["width"], d["width"]),
              "mlp_in": (d["width"], d["inner"]), "mlp_out": (d["inner"], d["width"])}
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"targets: {unknown} are not GPT-2 Dense layers (known: {sorted(shapes)})")
    return [shapes[t] for _ in range(d["layers"]) for t in targets]


def dense(name: str, batch: int, n_in: int, n_out: int, p: int) -> Op:
    """x (B, in) @ W (in, out) + bias: weight and bias read, input read, output written."""
    return Op(name, 2.0 * batch * n_in * n_out, p * (n_in * n_out + n_out) + p * batch * (n_in + n_out))


def merged_ops(cfg: dict, batch: int, cache_slots: int, dtype: str = "float32",
               cache_passes: int = CACHE_PASSES["gpu"]) -> list[Op]:
    """The ops of one decode step of the plain model (no adapter term)."""
    d, p = model_dims(cfg), DTYPE_BYTES[dtype]
    w, inner, heads, b, s = d["width"], d["inner"], d["heads"], batch, cache_slots
    ops = [Op("embed", 0.0, p * 3 * b * w)]  # wte and wpe rows gathered, their sum written
    for _ in range(d["layers"]):
        ops += [dense(name, b, w, w, p) for name in ("query", "key", "value")]
        ops.append(Op("attention", 4.0 * b * s * w,
                      cache_passes * 2 * b * s * w * p  # K and V over every slot
                      + 2 * b * w * p + 2 * b * w * p  # new k, v written; q read and output written
                      + b * heads * s * (2 * SCORE_BYTES + 2 * p)))  # scores and probs: written, read
        ops.append(dense("attn_out", b, w, w, p))
        ops.append(dense("mlp_in", b, w, inner, p))
        ops.append(dense("mlp_out", b, inner, w, p))
        # two norms (read x, write h; params 2w each), two residual adds (read 2, write 1), GELU
        ops.append(Op("elementwise", 0.0, p * (b * (10 * w + 2 * inner) + 4 * w)))
    ops.append(Op("ln_f", 0.0, p * (2 * b * w + 2 * w)))
    ops.append(Op("lm_head", 2.0 * b * w * d["vocab"], p * (d["vocab"] * w + b * (w + d["vocab"]))))
    ops.append(Op("argmax", 0.0, p * b * d["vocab"] + 4 * b))
    return ops


def vera_ops(shapes, batch: int, r: int, dtype: str = "float32") -> list[Op]:
    """The VeRA term's ops, per targeted layer: ((x @ A.T) * d[ids]) @ B.T * b[ids], added to y."""
    p, q, b = DTYPE_BYTES[dtype], ADAPTER_BYTES, batch
    ops = []
    for n_in, n_out in shapes:
        ops.append(Op("vera_down", 2.0 * b * n_in * r, q * r * n_in + p * b * n_in + q * b * r))
        ops.append(Op("vera_up", 2.0 * b * r * n_out, q * n_out * r + q * b * r + q * b * (r + n_out) + q * b * n_out))
        ops.append(Op("adapter_add", 0.0, q * b * n_out + 2 * p * b * n_out))
    return ops


def lora_ops(shapes, batch: int, r: int, distinct: int, dtype: str = "float32",
             gathers_materialized: bool = False) -> list[Op]:
    """The per-row gathered LoRA term's ops, per targeted layer: (x @ A[ids].T) @ B[ids].T, added.
    The distinct adapters' matrices are read from the stacks once; with `gathers_materialized`
    (XLA:CPU) the (B, r, in) and (B, out, r) copies are also written and re-read."""
    p, q, b = DTYPE_BYTES[dtype], ADAPTER_BYTES, batch
    copies = 2 * q * b * r if gathers_materialized else 0  # per input/output feature: written + re-read
    ops = []
    for n_in, n_out in shapes:
        ops.append(Op("lora_down", 2.0 * b * n_in * r,
                      q * distinct * r * n_in + copies * n_in + p * b * n_in + q * b * r))
        ops.append(Op("lora_up", 2.0 * b * r * n_out,
                      q * distinct * n_out * r + copies * n_out + q * b * r + q * b * n_out))
        ops.append(Op("adapter_add", 0.0, q * b * n_out + 2 * p * b * n_out))
    return ops


def is_cpu(device_kind: str) -> bool:
    """XLA's CPU and GPU backends lay this step out differently (cache transposes, LoRA gathers)."""
    return device_kind.lower() == "cpu"


def default_cache_passes(device_kind: str) -> int:
    return CACHE_PASSES["cpu" if is_cpu(device_kind) else "gpu"]


def gathers_materialized_on(device_kind: str) -> bool:
    """Whether XLA writes LoRA's gathered per-row matrices out before the dot on this device: on CPU
    it does, on the GPUs read here it fuses the gather into the reduction (see the module doc)."""
    return is_cpu(device_kind)


def summarize(ops: list[Op], peaks: Peaks) -> dict:
    """Total FLOPs and bytes, the per-op roofline step time, and the share of it spent memory-bound."""
    times = [(max(op.flops / peaks.flops, op.bytes / peaks.bandwidth), op.bytes / peaks.bandwidth >= op.flops
              / peaks.flops) for op in ops]
    step = sum(t for t, _ in times)
    return {"flops": sum(op.flops for op in ops), "bytes": sum(op.bytes for op in ops), "step_s": step,
            "memory_bound_share": sum(t for t, mem in times if mem) / step}


def block_config(block: dict) -> dict:
    """The GPT-2 config a benchmark record block was run with (records name the model and depth,
    and the width when --hidden changed it; heads are one per 64 then, as `serving_bench.run` sets)."""
    from vera_jax.models import hub

    cfg = {**hub.bundled_config(block["model"]), "n_layer": block["layers_run"]}
    width = block.get("width", cfg["n_embd"])
    if width != cfg["n_embd"]:
        cfg.update(n_embd=width, n_head=max(1, width // 64))
    return cfg


def within(measured: float, predicted: float, tolerance: float = 0.10) -> bool:
    return abs(measured / predicted - 1.0) <= tolerance


def predict_block(block: dict, peaks: Peaks, cache_passes: int | None = None, tolerance: float = 0.10) -> dict:
    """A copy of one benchmark record block with the roofline predictions beside every measured
    ratio. Measured fields are left as they were. For each row: `roofline` (FLOPs, bytes, predicted
    step), `roofline_ratio_vs_merged`, and the signed errors measured / predicted - 1 of both
    models, with whether each is within `tolerance`. `cache_passes` defaults to the backend's."""
    cfg = block_config(block)
    cache_passes = cache_passes or default_cache_passes(block["device"])
    dtype = block.get("dtype", "float32")  # every record so far ran the float32 model
    slots = block.get("cache_slots", block["context"] + 8)  # `serving_bench.run` allocates context + 8
    batch = block["batch"]
    base = merged_ops(cfg, batch, slots, dtype, cache_passes)
    merged = summarize(base, peaks)
    out = {**block, "peaks": peaks.as_dict(), "cache_passes": cache_passes, "cache_slots": slots, "dtype": dtype,
           "lora_gathers_materialized": gathers_materialized_on(block["device"]),
           "merged": {**block["merged"], "roofline": merged,
                      "measured_over_roofline_step": block["merged"]["step_s"] / merged["step_s"]}}
    shapes = target_shapes(cfg, block["targets"])
    for kind in ("vera", "lora"):
        rows = []
        for row in block.get(kind, []):
            extra = (vera_ops(shapes, batch, row["r"], dtype) if kind == "vera"
                     else lora_ops(shapes, batch, row["r"], row["distinct_in_batch"], dtype,
                                   gathers_materialized_on(block["device"])))
            cost = summarize(base + extra, peaks)
            roof = merged["step_s"] / cost["step_s"]
            flop = row["flop_ratio_vs_merged"]
            rows.append({**row, "roofline": cost, "roofline_ratio_vs_merged": roof,
                         "err_flop_only": row["vs_merged"] / flop - 1.0, "err_roofline": row["vs_merged"] / roof - 1.0,
                         "within_flop_only": within(row["vs_merged"], flop, tolerance),
                         "within_roofline": within(row["vs_merged"], roof, tolerance)})
        out[kind] = rows
    out["roofline_check"] = {"tolerance": tolerance, **{
        f"{kind}_within_{model}": f"{sum(r[f'within_{model}'] for r in out[kind])}/{len(out[kind])}"
        for kind in ("vera", "lora") for model in ("flop_only", "roofline")}, **{
        f"{kind}_max_abs_err_{model}": max((abs(r[f"err_{model}"]) for r in out[kind]), default=None)
        for kind in ("vera", "lora") for model in ("flop_only", "roofline")}}
    return out


def record_blocks(record: dict) -> dict:
    """name -> block of a record: one run's record is its own block ("run"); a file of several
    (like `serving_bench_h200.json`) holds each under a key."""
    if "merged" in record:
        return {"run": record}
    blocks = {k: v for k, v in record.items() if isinstance(v, dict) and "merged" in v}
    if not blocks:
        raise ValueError("the record holds no benchmark block (a dict with 'merged', 'vera', 'lora')")
    return blocks


def table(name: str, block: dict) -> str:
    """The predicted block as text: measured ratio vs merged beside both predictions and errors."""
    m = block["merged"]
    lines = [f"{name}: {block['device']}, batch {block['batch']}, context {block['context']}, "
             f"{block['layers_run']} layers, peaks {block['peaks']['flops']:.3g} FLOP/s, "
             f"{block['peaks']['bandwidth']:.3g} B/s, cache passes {block['cache_passes']}",
             f"  merged: measured step {m['step_s'] * 1e3:.3f} ms, roofline {m['roofline']['step_s'] * 1e3:.3f} ms "
             f"(measured / roofline {m['measured_over_roofline_step']:.2f}; "
             f"{m['roofline']['memory_bound_share']:.0%} of it memory-bound)",
             "  kind  r     N  distinct  measured  flop_only  err     roofline  err"]
    for kind in ("vera", "lora"):
        for row in block[kind]:
            lines.append(f"  {kind:<5} {row['r']:<5} {row['adapters']:<6} {row['distinct_in_batch']:<8}  "
                         f"{row['vs_merged']:.4f}    {row['flop_ratio_vs_merged']:.4f}     "
                         f"{row['err_flop_only']:+.3f}  {row['roofline_ratio_vs_merged']:.4f}    "
                         f"{row['err_roofline']:+.3f}")
    check = block["roofline_check"]
    lines.append(f"  within {check['tolerance']:.0%}: vera {check['vera_within_roofline']} roofline, "
                 f"{check['vera_within_flop_only']} flop-only; lora {check['lora_within_roofline']} roofline, "
                 f"{check['lora_within_flop_only']} flop-only")
    return "\n".join(lines)
