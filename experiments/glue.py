"""GLUE fine-tuning with VeRA, LoRA, full fine-tuning or the head only (the paper's Table 2).

    python -m experiments.glue --config configs/roberta_large_rte.py --workdir /tmp/rte
    python -m experiments.glue --config configs/roberta_base_mrpc.py:method=lora --workdir /tmp/mrpc
    python -m experiments.glue --config configs/minilm_rte.py --config.data.dir=../shared/data/glue

The checkpoint (`config.model.checkpoint`) and the data (tfds `glue/<task>`, or GLUE TSVs under
`config.data.dir`) are checked before anything heavy runs: offline, a Hub id or an unprepared tfds
dataset fails within seconds saying how to point at local files. Writes to the workdir the
trainer's metrics.jsonl, checkpoints/, the trained adapter (adapter/) and summary.json (per-epoch
dev metrics, best epoch, trainable parameters, wall time). The family itself is
`vera_jax.tasks.glue`.
"""

from absl import app, flags
from ml_collections import config_flags

from vera_jax.tasks import cli, glue, runner

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "GLUE config file (configs/roberta_*.py, configs/minilm_*.py)",
                                lock_config=False)
flags.DEFINE_string("workdir", None, f"output directory (default: {runner.default_workdir(glue.FAMILY)})")


def main(argv) -> None:
    del argv
    runner.main(glue.FAMILY, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
