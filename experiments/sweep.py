"""Seed / learning-rate / rank / task / method sweeps, run locally or emitted as commands, and
reported with the paper's rule: median over seeds of the best-epoch dev metric.

A sweep is an ml_collections config (see configs/sweeps/):

    c.module = "experiments.glue"          # each run: python -m <module> --config <config>
    c.config = "configs/minilm_mrpc.py"    #           --workdir <root>/<run> --config.<key>=<value> ...
    c.root = "runs/minilm_mrpc"            # one workdir per run under it
    c.fixed = {"num_epochs": 3, "data": {"train_limit": 0}}  # overrides shared by every run
                                           # (nested dicts give dotted keys: data.train_limit)
    c.grid = [{"method": ["vera"], "vera.r": [256, 1024]},   # union of cartesian products
              {"method": ["lora"]}]
    c.seeds = [0, 1, 2]                    # crossed with every grid point (key: c.seed_key)
    # The grid key "config" varies the config file itself (e.g. one per model and dataset):
    #   c.grid = [{"config": ["configs/vit_base_cifar100.py", "configs/vit_large_cifar100.py"]}]

    python -m experiments.sweep run configs/sweeps/minilm_mrpc.py [--workers 2]
    python -m experiments.sweep commands configs/sweeps/minilm_mrpc.py --format tpu --tpu NAME --zone ZONE
    python -m experiments.sweep report configs/sweeps/minilm_mrpc.py [--plot-x vera.r]

A run is finished when its workdir has summary.json; `run` skips those, so an interrupted sweep
resumes by running the same command (the trainer resumes an interrupted run from its own
checkpoints). A failed run is written to <root>/failures.jsonl and the sweep goes on.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import importlib.util
import itertools
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SUMMARY = "summary.json"
CONFIG_KEY = "config"  # a grid key naming the run's config file, not a --config.<key> override
FAILURES = "failures.jsonl"


@dataclass(frozen=True)
class Run:
    name: str
    params: dict  # key -> value, seed included
    workdir: Path


def load_sweep(spec: str):
    """`path.py` or `path.py:arg`, whose get_config([arg]) returns the sweep ConfigDict."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"_sweep_{Path(path).stem}", path)
    if module_spec is None:
        raise FileNotFoundError(f"{path}: no such sweep config")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for field in ("module", "config", "root", "grid", "seeds"):
        if field not in config:
            raise ValueError(f"sweep config {path}: missing field {field!r}")
    if not config.seeds:
        raise ValueError(f"sweep config {path}: seeds must not be empty")
    return config


def _format(value) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def expand(config) -> list[Run]:
    """Every run of the sweep: each grid entry's cartesian product crossed with the seeds,
    deduplicated, in declaration order."""
    seed_key = config.get("seed_key", "seed")
    runs, seen = [], set()
    for entry in config.grid or [{}]:
        keys = list(entry)
        for values in itertools.product(*(list(entry[k]) for k in keys)):
            for seed in config.seeds:
                params = dict(zip(keys, values)) | {seed_key: seed}
                name = ",".join(f"{k}={_format(v)}" for k, v in params.items()).replace("/", "_")
                if name not in seen:
                    seen.add(name)
                    runs.append(Run(name, params, Path(config.root) / name))
    return runs


def _dotted(overrides, prefix: str = "") -> dict:
    """{"data": {"train_limit": 0}} -> {"data.train_limit": 0} (ConfigDict refuses dotted keys)."""
    out = {}
    for key, value in dict(overrides).items():
        if hasattr(value, "items"):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def command(config, run: Run, python: str = sys.executable) -> list[str]:
    params = dict(run.params)
    config_file = params.pop(CONFIG_KEY, config.config)
    args = [python, "-m", config.module, f"--config={config_file}", f"--workdir={run.workdir}"]
    for key, value in {**_dotted(config.get("fixed", {})), **params}.items():
        args.append(f"--config.{key}={_format(value)}")
    return args


def is_finished(run: Run) -> bool:
    return (run.workdir / SUMMARY).is_file()


def _execute(config, run: Run) -> tuple[Run, int, float]:
    run.workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run.workdir / "sweep.log", "ab") as log:
        code = subprocess.call(command(config, run), stdout=log, stderr=subprocess.STDOUT)
    return run, code, time.time() - start


def run_local(config, workers: int = 1) -> dict:
    """Runs the unfinished runs (N at a time); returns counts of skipped, finished and failed."""
    runs = expand(config)
    todo = [r for r in runs if not is_finished(r)]
    counts = {"total": len(runs), "skipped": len(runs) - len(todo), "finished": 0, "failed": 0}
    print(f"sweep {config.root}: {len(runs)} runs, {counts['skipped']} already finished, {len(todo)} to run",
          flush=True)
    Path(config.root).mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, (run, code, seconds) in enumerate(pool.map(lambda r: _execute(config, r), todo), 1):
            ok = code == 0 and is_finished(run)
            counts["finished" if ok else "failed"] += 1
            status = "done" if ok else f"FAILED (exit {code})"
            print(f"[{i}/{len(todo)}] {status} {run.name} ({seconds:.0f} s)", flush=True)
            if not ok:
                with open(Path(config.root) / FAILURES, "a") as f:
                    f.write(json.dumps({"run": run.name, "exit_code": code, "log": str(run.workdir / "sweep.log"),
                                        "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    return counts


def emit(config, fmt: str, tpu: str = "", zone: str = "", python: str = "python") -> list[str]:
    """One shell line per unfinished run: plain `python -m ...`, or a Cloud TPU VM ssh that runs it
    on every worker of the slice (multi-host runs need all workers; the trainer calls
    jax.distributed.initialize)."""
    lines = []
    for run in expand(config):
        if is_finished(run):
            continue
        cmd = shlex.join(command(config, run, python))
        if fmt == "shell":
            lines.append(cmd)
        elif fmt == "tpu":
            if not tpu or not zone:
                raise ValueError("--format tpu needs --tpu NAME and --zone ZONE")
            lines.append(f"gcloud compute tpus tpu-vm ssh {shlex.quote(tpu)} --zone={shlex.quote(zone)} --worker=all "
                         f"--command={shlex.quote(cmd)}")
        else:
            raise ValueError(f"--format: {fmt!r} is not one of ['shell', 'tpu']")
    return lines


def collect(config) -> list[dict]:
    """One row per finished run: its params and the best-epoch eval metrics from summary.json."""
    rows = []
    for run in expand(config):
        if not is_finished(run):
            continue
        summary = json.loads((run.workdir / SUMMARY).read_text())
        best = summary.get("best", {})
        rows.append({"run": run, "best_metric": best.get("metric"), "metrics": best.get("metrics") or {},
                     "best_epoch": best.get("epoch"), "trainable_params": summary.get("trainable_params")})
    return rows


def median_table(config, rows: list[dict]) -> list[dict]:
    """Groups runs that differ only in the seed; median of every best-epoch metric per group."""
    seed_key = config.get("seed_key", "seed")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = tuple((k, _format(v)) for k, v in row["run"].params.items() if k != seed_key)
        groups.setdefault(key, []).append(row)
    table = []
    for key, members in groups.items():
        names = sorted({m for r in members for m in r["metrics"]})
        entry = dict(key) | {
            "seeds": len(members),
            "trainable_params": members[0]["trainable_params"],
            "best_metric": members[0]["best_metric"],
        }
        for name in names:
            values = [float(r["metrics"][name]) for r in members if name in r["metrics"]]
            entry[f"median_{name}"] = statistics.median(values)
        table.append(entry)
    return table


def write_report(config, table: list[dict], plot_x: str = "") -> dict[str, Path]:
    root = Path(config.root)
    root.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in table for k in row))
    with open(root / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in table]
    (root / "report.md").write_text("\n".join(lines) + "\n")
    out = {"csv": root / "report.csv", "md": root / "report.md"}
    if plot_x:
        out["png"] = _plot(config, table, plot_x, root / "report.png")
    return out


def _plot(config, table: list[dict], x_key: str, path: Path) -> Path:
    """Median best metric against `x_key`, one line per value of the other non-seed keys.
    `x_key` may list alternatives ("vera.r,lora.r"): each row uses the first it has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = f"median_{table[0]['best_metric']}" if table else ""
    x_keys = x_key.split(",")
    series: dict[str, list] = {}
    for row in table:
        key = next((k for k in x_keys if k in row), None)
        if key is None or metric not in row:
            continue
        label = ", ".join(f"{k}={v}" for k, v in row.items()
                          if k not in (key, "seeds", "trainable_params", "best_metric") and not k.startswith("median_"))
        series.setdefault(label, []).append((float(row[key]), row[metric]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label or metric)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"{metric} (median over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p_run = sub.add_parser("run", help="run the unfinished runs locally")
    p_run.add_argument("sweep")
    p_run.add_argument("--workers", type=int, default=1, help="runs at a time")
    p_cmd = sub.add_parser("commands", help="print one command per unfinished run")
    p_cmd.add_argument("sweep")
    p_cmd.add_argument("--format", default="shell", help="shell | tpu")
    p_cmd.add_argument("--tpu", default="", help="Cloud TPU VM name (--format tpu)")
    p_cmd.add_argument("--zone", default="", help="Cloud TPU zone (--format tpu)")
    p_cmd.add_argument("--python", default="python", help="interpreter on the target machine")
    p_rep = sub.add_parser("report", help="median over seeds of the best-epoch metrics (markdown + CSV)")
    p_rep.add_argument("sweep")
    p_rep.add_argument("--plot-x", default="",
                       help="swept key(s) to plot the median metric against (e.g. vera.r,lora.r)")
    args = parser.parse_args(argv)
    config = load_sweep(args.sweep)
    if args.action == "run":
        counts = run_local(config, args.workers)
        print(json.dumps(counts))
        return 1 if counts["failed"] else 0
    if args.action == "commands":
        print("\n".join(emit(config, args.format, args.tpu, args.zone, args.python)))
        return 0
    rows = collect(config)
    table = median_table(config, rows)
    paths = write_report(config, table, args.plot_x)
    print(paths["md"].read_text(), end="")
    missing = len(expand(config)) - len(rows)
    print(f"{len(rows)} finished runs in {len(table)} groups" + (f"; {missing} not finished" if missing else ""))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
