"""HF PEFT's MetaMathQA -> GSM8K method comparison (`method_comparison/MetaMathQA/`) as a family
on the runner: train on MetaMathQA (or GSM8K train), validate on PEFT's 50 GSM8K train rows,
test on the GSM8K test split by greedy decoding and PEFT's answer parsing.

    python -m experiments.math --config configs/llama32_3b_metamathqa.py --workdir runs/math_vera
    python -m experiments.math --config configs/llama32_3b_metamathqa.py:method=lora --workdir runs/math_lora
    python -m experiments.math --config configs/smollm2_gsm8k.py --workdir runs/smollm2_gsm8k_vera

Writes workdir/results.json in PEFT's results layout (train_info: accelerator_memory_max,
train_time, file_size of the adapter in PEFT's format, num_trainable_params, metrics with
"valid accuracy" rows and the final "test accuracy", "train total tokens", "tokens / sec"),
workdir/predictions/{valid,test}_step_N.jsonl, the adapter (ours and PEFT's format) and
summary.json.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from vera_jax.tasks import cli, runner
from vera_jax.tasks import math as math_family

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None,
                                "math config (configs/llama32_3b_metamathqa.py, configs/smollm2_gsm8k.py)",
                                lock_config=False)
flags.DEFINE_string("workdir", None, f"output directory (default: {runner.default_workdir(math_family.FAMILY)})")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    runner.main(math_family.FAMILY, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
