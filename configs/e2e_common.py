"""Shared E2E NLG config: trainer defaults plus the paper's GPT-2 recipe (VeRA, Table 10) and the
LoRA paper's E2E settings for `:method=lora`. A model file states only what differs."""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg
from vera_jax import LoraConfig, VeraConfig
from vera_jax.tasks.config import method_config, model_config
from vera_jax.train import default_config


def base_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, method="vera", seed=0)
    c = default_config()
    c.seed = a.seed  # data order, dropout and VeRA/LoRA init
    c.method = a.method  # vera | lora | full
    c.network_timeout = 5.0  # seconds to wait for the Hub / tfds hosts before failing with advice

    c.model = model_config()  # checkpoint, tokenizer, head, random_init, overrides
    c.model.checkpoint = ""  # Hub id (e.g. gpt2-medium), local checkpoint dir, or a LLaMA .gguf file
    c.model.head = ()  # nothing beyond the adapter trains (the LM head is tied to the embeddings)

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # directory of the official CSVs (trainset.csv, devset.csv, testset_w_refs.csv); "" reads tfds
    c.data.tfds_data_dir = ""  # tfds data_dir for e2e_cleaned (the cleaned variant, not the paper's data)
    c.data.download = True  # download and prepare tfds e2e_cleaned when missing (needs network)
    c.data.eval_split = "test"  # dev | test: the MRs decoded and scored
    c.data.max_length = 128  # tokens of MR + separator + reference (longer pairs are cut; counted in the summary)
    c.data.buckets = (32, 48, 64, 96)  # padded batch lengths below max_length
    c.data.sort_window = 16  # sort windows of this many batches by length (less padding)
    c.data.train_limit = 0  # >0: a fixed random subset of this many training pairs
    c.data.eval_limit = 0  # >0: only the first N distinct MRs of the eval split

    c.decode = ml_collections.ConfigDict()  # the LoRA reference setup's decoding
    c.decode.num_beams = 10  # beam width
    c.decode.length_penalty = 0.8  # hypothesis score = sum log p / length ** length_penalty
    c.decode.no_repeat_ngram_size = 4  # no 4-gram appears twice in prompt + output
    c.decode.max_new_tokens = 64  # outputs stop at EOS, a blank line, or this many tokens

    c.vera = method_config(VeraConfig, r=1024, targets=("query", "value"), d_initial=0.1)
    c.lora = method_config(LoraConfig, r=4, alpha=32.0, targets=("query", "value"), dropout=0.1)

    c.lr = ml_collections.ConfigDict()  # the one place learning rates are set
    c.lr.vera = 1e-1  # VeRA d and b (GPT-2 Medium; Large uses 2e-2)
    c.lr.lora = 2e-4  # LoRA A and B (LoRA paper, E2E)
    c.lr.head = 0.0  # unused: nothing is in model.head
    c.lr.full = 1e-5  # every weight in method=full

    c.label_smoothing = 0.1  # on the continuation tokens' cross-entropy
    c.adapter_path = "auto"  # LoRA's dropout needs the factored term; auto picks per layer otherwise
    c.optimizer.weight_decay = 0.01
    c.optimizer.warmup_steps = 500
    c.optimizer.schedule = "linear"
    c.num_epochs = 5.0
    c.batch_size = 8
    c.eval_batch_size = 16  # MRs per beam-search batch (x num_beams rows)
    c.eval_every = "end"  # the paper reports the last epoch; a step count or "epoch" also work
    c.best_metric = "BLEU"
    c.save_adapter = True  # write the trained vectors to workdir/adapter
    c.log_every_steps = 100
    return c
