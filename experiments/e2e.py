"""E2E NLG Challenge (the paper's Table 3): fine-tune a causal LM, or score predictions with the
official scorer's five metrics (no model needed).

    python -m experiments.e2e --config configs/gpt2_medium_e2e.py --workdir runs/e2e_medium
    python -m experiments.e2e --config configs/gpt2_medium_e2e.py:method=lora --workdir runs/e2e_medium_lora
    python -m experiments.e2e --config configs/smollm2_e2e.py --config.num_train_steps=0   # the untuned model
    python -m experiments.e2e score --references ../shared/data/e2e/testset_w_refs.csv --predictions out.txt
    python -m experiments.e2e template --references ../shared/data/e2e/devset.csv --output template.txt

`score` reads the reference CSV (`mr,ref`), groups references per distinct MR in first-appearance
order and reads one prediction per line in that order, then prints one JSON object:
{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"} on the official scale (BLEU 0.6616, not 66.16).
A predictions file with a different number of lines is refused (exit 2) with both counts.
METEOR, ROUGE-L and CIDEr need Java. `template` writes the fixed-template baseline (one line per
distinct MR), a floor any trained model should beat. The metrics live in `vera_jax.metrics.nlg`.
Training (`vera_jax.tasks.e2e` on the runner) writes, per eval, predictions/step_N/ with the
predictions file, the references it scored against and the metrics JSON, plus summary.json.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from vera_jax.data import e2e
from vera_jax.metrics import nlg
from vera_jax.tasks import cli, runner
from vera_jax.tasks import e2e as e2e_family

MODES = ("score", "template")
FLAGS = flags.FLAGS
flags.DEFINE_string("references", None, "official E2E CSV with mr,ref columns (e.g. testset_w_refs.csv)")
flags.DEFINE_string("predictions", None, "score: text file, one prediction per distinct MR in first-appearance order")
flags.DEFINE_string("output", None, "template: where to write the baseline predictions")
config_flags.DEFINE_config_file("config", None,
                                "training: E2E config file (configs/gpt2_*_e2e.py, configs/smollm2_e2e.py)",
                                lock_config=False)
flags.DEFINE_string("workdir", None,
                    f"training: output directory (default: {runner.default_workdir(e2e_family.FAMILY)})")


class Refused(Exception):
    """An input the command will not score; the message is the one-line error it prints."""


def read_predictions(path: str) -> list[str]:
    """One prediction per line; lines split as the official scorer's reader splits them (str.splitlines)."""
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def score(references: str, predictions: str) -> dict[str, float]:
    """The five metrics of the predictions file against the reference CSV."""
    mrs, refs = e2e.read_csv(references).by_mr()
    preds = read_predictions(predictions)
    if len(preds) != len(mrs):
        raise Refused(f"{predictions} has {len(preds)} lines but {references} has {len(mrs)} distinct MRs; "
                      "write one prediction per distinct MR, in first-appearance order")
    return nlg.score_e2e(preds, refs)


def main(argv) -> None:
    if len(argv) == 1 and FLAGS.config is not None:
        runner.main(e2e_family.FAMILY, FLAGS.config, FLAGS.workdir)
        return
    mode = argv[1] if len(argv) == 2 else None
    if mode not in MODES:
        raise app.UsageError(f"give --config to train, or one mode, {' or '.join(MODES)}; got {argv[1:]}")
    try:
        if not FLAGS.references:
            raise Refused("--references is required")
        if mode == "score":
            if not FLAGS.predictions:
                raise Refused("score needs --predictions")
            print(json.dumps(score(FLAGS.references, FLAGS.predictions)))
        else:
            if not FLAGS.output:
                raise Refused("template needs --output")
            mrs, _ = e2e.read_csv(FLAGS.references).by_mr()
            with open(FLAGS.output, "w", encoding="utf-8") as f:
                f.writelines(e2e.template(mr) + "\n" for mr in mrs)
    except (Refused, e2e.E2EDataError, nlg.JavaNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
