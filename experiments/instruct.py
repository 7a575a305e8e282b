"""Instruction tuning (the paper's Table 4): a LLaMA-architecture causal LM on alpaca-format data
with VeRA, LoRA or full fine-tuning, loss on response tokens only, held-out response loss as eval.

    python -m experiments.instruct --config configs/llama2_7b_alpaca.py --workdir runs/llama2_7b_vera
    python -m experiments.instruct --config configs/llama2_7b_alpaca.py:method=lora \
        --config.model.checkpoint=/path/to/Llama-2-7b-hf --config.data.path=/path/to/alpaca_data_cleaned.json
    python -m experiments.instruct --config configs/smollm2_alpaca.py --workdir runs/smollm2_alpaca_vera

Writes workdir/adapter (the trained vectors) and summary.json (held-out loss per eval, padding
fraction, truncated and bad-record counts, wall time); answer MT-Bench with `experiments.mt_bench`.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from vera_jax.tasks import cli, instruct, runner

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "instruction-tuning config (configs/*_alpaca.py)",
                                lock_config=False)
flags.DEFINE_string("workdir", None, f"output directory (default: {runner.default_workdir(instruct.FAMILY)})")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    runner.main(instruct.FAMILY, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
