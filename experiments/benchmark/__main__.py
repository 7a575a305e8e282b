"""Benchmark CLI: prints the JSON record on one line (or, with --format=markdown, a table) and
writes it to --json PATH if given.

    python -m experiments.benchmark --model=roberta-base --layers=2 --batch=8 --seq=512
    python -m experiments.benchmark --model=roberta-base --layers=2 --against=peft --format=markdown
    python -m experiments.benchmark --crossover --model=roberta-base --crossover_ranks=64,1024
    python -m experiments.benchmark --scan_layers --model=roberta-base --scan_depths=6,12,24,48 --format=markdown
    python -m experiments.benchmark --floor_profile --model=roberta-base --batch=8 --seq=256 --format=markdown
"""

from __future__ import annotations

import json

from absl import app, flags

from .crossover import crossover_markdown, crossover_record
from .floor_profile import floor_profile_markdown, floor_profile_record
from .report import benchmark_record, markdown
from .scan import DEPTHS, SCAN_METHODS, scan_markdown, scan_record
from .shapes import PAPER_RANK
from .steps import METHODS

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "roberta-base", sorted(PAPER_RANK), "model whose shape is benchmarked (random weights)")
flags.DEFINE_integer("layers", None, "override the depth (the record says how many ran)", lower_bound=1)
flags.DEFINE_integer("hidden", None, "override the width (MLP and heads follow); for quick checks", lower_bound=8)
flags.DEFINE_integer("batch", 8, "sequences per step", lower_bound=1)
flags.DEFINE_integer("seq", 512, "tokens per sequence", lower_bound=1)
flags.DEFINE_integer("iters", 10, "timed steps (the median is reported)", lower_bound=1)
flags.DEFINE_integer("warmup", 2, "untimed steps before them", lower_bound=0)
flags.DEFINE_list("methods", list(METHODS), f"vera_jax methods to run (the floor always runs): {','.join(METHODS)}")
flags.DEFINE_integer("vera_r", None, "VeRA rank (default: the paper's for the model)", lower_bound=1)
flags.DEFINE_integer("lora_r", 8, "LoRA rank (alpha = r)", lower_bound=1)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "weights and compute dtype")
flags.DEFINE_enum("against", None, ["peft"], "also run HF PEFT (PyTorch) on the same shapes")
flags.DEFINE_bool("crossover", False, "one-layer merged vs factored sweep instead of the model benchmark")
flags.DEFINE_list("crossover_ranks", ["16", "64", "256", "1024", "4096"], "VeRA ranks of the crossover sweep")
flags.DEFINE_list("crossover_tokens", ["64", "256", "1024", "4096", "16384"], "token counts of the crossover sweep")
flags.DEFINE_bool("scan_layers", False, "scanned vs unrolled layers at each of --scan_depths: compile time and step "
                  f"time (methods: {','.join(SCAN_METHODS)}; default floor) instead of the model benchmark")
flags.DEFINE_bool("floor_profile", False, "one encoder layer's parts (matmuls, attention, LayerNorm, GELU), forward + "
                  "backward, JAX beside torch, instead of the model benchmark (XLA_FLAGS as set in the environment)")
flags.DEFINE_list("scan_depths", [str(d) for d in DEPTHS], "depths of the --scan_layers comparison")
flags.DEFINE_bool("count_only", False, "count XLA's FLOPs per method and the minimum, on abstract weights, "
                  "without running (e.g. a GPU run's shape, on a CPU)")
flags.DEFINE_enum("format", "json", ["json", "markdown"], "stdout: the JSON record on one line, or a markdown table")
flags.DEFINE_string("json", None, "also write the JSON record to this file")


@flags.validator("methods")
def _known_methods(methods: list[str]) -> bool:
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise flags.ValidationError(f"unknown {unknown}; known: {list(METHODS)}")
    return True


@flags.multi_flags_validator(["crossover_ranks", "crossover_tokens", "scan_depths"])
def _positive_ints(values: dict) -> bool:
    for name, items in values.items():
        if not all(x.isdigit() and int(x) > 0 for x in items):
            raise flags.ValidationError(f"--{name}: expected comma-separated positive integers, got {items}")
    return True


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.scan_layers:
        if FLAGS.layers is not None:
            raise app.UsageError("--layers: with --scan_layers the depths are --scan_depths")
        methods = FLAGS.methods if FLAGS["methods"].present else ["floor"]
        record = scan_record(FLAGS.model, [int(x) for x in FLAGS.scan_depths], FLAGS.hidden, FLAGS.batch, FLAGS.seq,
                             FLAGS.iters, FLAGS.warmup, methods, FLAGS.dtype)
        table = scan_markdown
    elif FLAGS.floor_profile:
        record = floor_profile_record(FLAGS.model, FLAGS.hidden, FLAGS.batch, FLAGS.seq, FLAGS.iters, FLAGS.warmup,
                                      FLAGS.dtype)
        table = floor_profile_markdown
    elif FLAGS.crossover:
        record = crossover_record(FLAGS.model, FLAGS.hidden, [int(x) for x in FLAGS.crossover_ranks],
                                  [int(x) for x in FLAGS.crossover_tokens], FLAGS.iters, FLAGS.warmup, FLAGS.dtype)
        table = crossover_markdown
    else:
        record = benchmark_record(FLAGS.model, FLAGS.layers, FLAGS.hidden, FLAGS.batch, FLAGS.seq, FLAGS.iters,
                                  FLAGS.warmup, FLAGS.methods, FLAGS.vera_r or PAPER_RANK[FLAGS.model],
                                  FLAGS.lora_r, FLAGS.dtype, FLAGS.against == "peft", FLAGS.count_only)
        table = markdown
    line = json.dumps(record)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            f.write(line + "\n")
    print(table(record) if FLAGS.format == "markdown" else line, flush=True)


if __name__ == "__main__":
    app.run(main)
