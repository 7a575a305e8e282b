"""MT-Bench answers (the paper's Table 4 evaluation) in FastChat's gen_model_answer JSONL format,
from the base model of an instruct config with the adapter a run saved (or without one: the base).

    python -m experiments.mt_bench --config configs/llama2_7b_alpaca.py --adapter runs/llama2_7b_vera/adapter
    python -m experiments.mt_bench --config configs/smollm2_alpaca.py --adapter runs/smollm2_alpaca_vera/adapter \
        --output runs/mt_bench/model_answer/smollm2-vera.jsonl
    python -m experiments.mt_bench --config configs/smollm2_alpaca.py --config.data.template=chat  # the base

The prompt format is the config's data.template (the one the adapter was trained with); decoding
settings come from config.mt_bench (max_new_tokens, batch_size, top_k, limit, questions). The
default output is <adapter dir>/../model_answer/<model_id>.jsonl (FastChat's layout). Judging
needs GPT-4 through FastChat (see the README); this command scores nothing.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

import vera_jax
from vera_jax.data.common import DataUnavailableError
from vera_jax.models import loader
from vera_jax.tasks import mt_bench

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "instruct config (configs/*_alpaca.py)", lock_config=False)
flags.DEFINE_string("adapter", None, "adapter directory a run saved (workdir/adapter); none: the base model")
flags.DEFINE_string("output", None, "answers JSONL (default: <adapter>/../model_answer/<model_id>.jsonl)")
flags.DEFINE_string("model_id", None, "model_id in the file (default: <checkpoint name>-<method or base>)")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config = FLAGS.config
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/smollm2_alpaca.py")
    name = os.path.basename(config.model.checkpoint.rstrip("/")).removesuffix(".gguf")
    model_id = FLAGS.model_id or f"{name}-{config.method if FLAGS.adapter else 'base'}"
    output = FLAGS.output or os.path.join(os.path.dirname(os.path.abspath(FLAGS.adapter)) if FLAGS.adapter else ".",
                                          "model_answer", f"{model_id}.jsonl")
    m = config.mt_bench
    try:
        questions = mt_bench.read_questions(m.questions, m.limit)
        model = loader.load_model(loader.ModelSpec.from_config(config))
        params = vera_jax.load_adapter(FLAGS.adapter, model.params) if FLAGS.adapter else model.params
        answers, facts = mt_bench.answer(
            model, params, questions, template=config.data.template, max_new_tokens=m.max_new_tokens,
            batch_size=m.batch_size, top_k=m.top_k, seed=config.seed,
            path=config.adapter_path if FLAGS.adapter else None, log=lambda s: print(s, file=sys.stderr))
    except (loader.ConfigError, loader.CheckpointUnavailableError, DataUnavailableError, FileNotFoundError,
            ValueError, vera_jax.AdapterFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    mt_bench.write_jsonl(output, mt_bench.records(questions, answers, model_id))
    print(json.dumps({"model_id": model_id, "questions": len(questions), "output": output,
                      "max_new_tokens": m.max_new_tokens, **facts}))


if __name__ == "__main__":
    app.run(main)
