"""The benchmark record: every method's figures on one shape, their ratios to the floor and to
PEFT, and its markdown table."""

from __future__ import annotations

from .peft_ref import run_peft
from .shapes import model_config, shape_summary
from .steps import METHODS, PATHS, run_jax
from .timing import machine

# vera_jax method -> its PyTorch twin in the PEFT rows
PEFT_TWIN = {"floor": "peft_floor", "lora": "peft_lora", **{m: "peft_vera" for m in PATHS if m.startswith("vera_")}}


def add_minimum(rows: dict) -> None:
    """Beside each measured step: the arithmetic minimum as a multiple of the floor (`min_vs_floor`:
    floor FLOPs + the cost model's extra for that method and path, over the floor's FLOPs), the
    measured step over that minimum (`step_vs_min`; 1.0 = the step costs exactly its extra FLOPs
    at the floor's FLOP rate) and XLA's own FLOP count of the compiled step over the floor's
    (`xla_flops_vs_floor`: whether the program does extra arithmetic, or only runs slower)."""
    floor_flops = rows["floor"].get("xla_flops")
    for res in rows.values():
        extra, flops = res.get("extra_flops_min"), res.get("xla_flops")
        res["min_vs_floor"] = (floor_flops + extra) / floor_flops if floor_flops and extra is not None else None
        timed = res["min_vs_floor"] and "step_vs_floor" in res
        res["step_vs_min"] = res["step_vs_floor"] / res["min_vs_floor"] if timed else None
        res["xla_flops_vs_floor"] = flops / floor_flops if floor_flops and flops else None


def add_ratios(rows: dict, peft_rows: dict | None) -> None:
    """Ratios to the vera_jax floor of the same run (time, compile, memory, FLOPs and the
    arithmetic minimum) and, per method, to its PEFT twin's step time."""
    floor = rows["floor"]
    floor_peak = floor["memory"].get("peak_estimate")
    for res in list(rows.values()) + list((peft_rows or {}).values()):
        res["step_vs_floor"] = res["step_ms"] / floor["step_ms"]
        if "compile_s" in res:
            res["compile_vs_floor"] = res["compile_s"] / floor["compile_s"]
        peak = res["memory"].get("peak_estimate")
        res["memory_vs_floor"] = peak / floor_peak if peak is not None and floor_peak else None
    add_minimum(rows)
    for method, res in rows.items():
        if peft_rows and PEFT_TWIN.get(method) in peft_rows:
            res["step_vs_peft"] = res["step_ms"] / peft_rows[PEFT_TWIN[method]]["step_ms"]


def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:.1f}"


def count_markdown(record: dict) -> str:
    """The table of a --count_only record: FLOPs and the minimum, no timings."""
    s = record["shape"]
    lines = [f"### FLOPs counted (not run): {s['model']} shape, {s['layers']} of {s['full_layers']} layers, "
             f"hidden {s['hidden']}, {s['tokens']} tokens/step, {s['dtype']}, VeRA r={s['vera_r']}, "
             f"LoRA r={s['lora_r']}", "",
             "| method | XLA GFLOPs | XLA FLOPs × floor | minimum × floor |", "|---|---|---|---|"]
    for method, r in record["methods"].items():
        lines.append(f"| {method} | {_f(r['xla_flops'] and r['xla_flops'] / 1e9, '.1f')} | "
                     f"{_f(r['xla_flops_vs_floor'], '.3f')} | {_f(r['min_vs_floor'], '.3f')} |")
    return "\n".join(lines)


def markdown(record: dict) -> str:
    if record["mode"] == "count":
        return count_markdown(record)
    s, m = record["shape"], record["machine"]
    lines = [
        f"### {s['model']} shape: {s['layers']} of {s['full_layers']} layers, hidden {s['hidden']}, "
        f"batch {s['batch']} x seq {s['seq']} = {s['tokens']} tokens/step, {s['dtype']}, VeRA r={s['vera_r']}, "
        f"LoRA r={s['lora_r']} (query, value)",
        "",
        f"{m['jax']}; load average {m['load_avg']} over {m['cpus']} CPUs; median of {s['iters']} steps after "
        f"{s['warmup']} warm-up, methods interleaved; minimum = floor FLOPs + the cost model's extra for the method "
        "and path",
        "",
    ]
    peft_rows = record.get("peft")
    header = ("| method | step ms | × floor | minimum × floor | × minimum | XLA FLOPs × floor | compile s | × floor "
              "| XLA peak MiB | × floor | XLA temp MiB | device peak MiB | trainable |")
    if peft_rows:
        header += " × PEFT |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for method, r in record["methods"].items():
        row = (f"| {method} | {r['step_ms']:.2f} | {r['step_vs_floor']:.3f} | {_f(r.get('min_vs_floor'), '.3f')} | "
               f"{_f(r.get('step_vs_min'), '.3f')} | {_f(r.get('xla_flops_vs_floor'), '.3f')} | {r['compile_s']:.2f} | "
               f"{r['compile_vs_floor']:.2f} | {_mib(r['memory'].get('peak_estimate'))} | "
               f"{_f(r['memory_vs_floor'], '.3f')} | {_mib(r['memory'].get('temp'))} | "
               f"{_mib(r['memory'].get('device_peak'))} | {r['trainable']:,} |")
        if peft_rows:
            row += f" {_f(r.get('step_vs_peft'), '.3f')} |"
        lines.append(row)
    if peft_rows:
        for name, r in peft_rows.items():
            peak = _mib(r['memory'].get('device_peak'))
            lines.append(f"| {name} | {r['step_ms']:.2f} | {r['step_vs_floor']:.3f} | – | – | – | "
                         f"{r['first_step_s']:.2f} (1st step) | – | – | – | – | {peak} | {r['trainable']:,} | – |")
        lines += ["", f"PEFT: {record['peft_device']}."]
    return "\n".join(lines)


def benchmark_record(model: str, layers: int | None, hidden: int | None, batch: int, seq: int, iters: int,
                     warmup: int, methods: list[str], vera_r: int, lora_r: int, dtype: str,
                     against_peft: bool, count_only: bool = False) -> dict:
    """Runs `methods` (the floor always first) and, with `against_peft`, the PyTorch rows on one
    shape; returns the JSON-ready record: shape, per-method figures and ratios, machine.
    count_only: XLA's FLOPs and the minimum per method, nothing run (mode "count")."""
    cfg = model_config(model, layers, hidden)
    methods = ["floor"] + [m for m in METHODS if m in methods and m != "floor"]
    shape = {**shape_summary(cfg, model), "batch": batch, "seq": seq, "tokens": batch * seq, "dtype": dtype,
             "vera_r": vera_r, "lora_r": lora_r, "iters": iters, "warmup": warmup}
    rows = run_jax(cfg, methods, batch, seq, iters, warmup, vera_r, lora_r, dtype, count_only)
    if count_only:
        add_minimum(rows)
        return {"mode": "count", "shape": shape, "methods": rows, "machine": machine()}
    record = {"mode": "benchmark", "shape": shape, "methods": rows}
    if against_peft:
        peft_rows = run_peft(cfg, batch, seq, iters, warmup, vera_r, lora_r, dtype)
        record["peft_device"] = peft_rows.pop("_device")
        record["peft"] = peft_rows
    add_ratios(rows, record.get("peft"))
    record["machine"] = machine()
    return record
