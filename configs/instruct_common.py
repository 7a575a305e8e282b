"""Shared instruction-tuning config: trainer defaults plus the paper's Table 9 recipe for
Llama / Llama 2 on alpaca-cleaned (AdamW, cosine schedule, warmup ratio 0.1, batch 4 x 4
accumulation steps, 1 epoch; VeRA r=1024 lr 4e-3, LoRA r=64 lr 4e-4) on every linear layer but
lm_head. A model file states only its checkpoint and what differs.

LoRA's alpha and dropout follow QLoRA's Llama scripts (artidoro/qlora,
scripts/finetune_guanaco_{7b,13b}.sh): alpha 16 for every size, dropout 0.1 for 7B and 0.05 for
13B (`lora_dropout(size)`); dropout acts on the adapter input, so LoRA runs on the factored path.
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg
from vera_jax import LoraConfig, VeraConfig
from vera_jax.tasks.config import method_config, model_config
from vera_jax.train import default_config

TARGETS = ("query", "key", "value", "attn_out", "gate", "up", "down")  # every linear layer but lm_head
QLORA_DROPOUT = {"7b": 0.1, "13b": 0.05}  # QLoRA's finetune_guanaco_{7b,13b}.sh


def base_config(arg: str | None = None, size: str = "7b") -> ml_collections.ConfigDict:
    a = parse_arg(arg, method="vera", seed=0)
    c = default_config()
    c.seed = a.seed  # data order, dropout and VeRA/LoRA init (the held-out slice is fixed)
    c.method = a.method  # vera | lora | full
    c.network_timeout = 5.0  # seconds to wait for the Hub before failing with advice

    c.model = model_config()  # checkpoint, tokenizer, head, random_init, overrides
    c.model.checkpoint = ""  # Hub id, local checkpoint dir or a LLaMA .gguf file
    c.model.head = ()  # nothing beyond the adapter trains

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # local alpaca-format JSON array or JSONL; "" reads data.hub_dataset
    c.data.hub_dataset = "yahma/alpaca-cleaned"  # the paper's data (51,760 records)
    c.data.hub_file = "alpaca_data_cleaned.json"  # the dataset repo's file, read when `datasets` is not installed
    c.data.revision = ""  # Hub revision of hub_dataset ("" : main)
    c.data.bad_records = "skip"  # skip | refuse: records missing a field or with an empty instruction/output
    c.data.template = "alpaca"  # alpaca (Stanford's prompt) | chat (the tokenizer's chat template)
    c.data.max_length = 512  # tokens of prompt + output + EOS (Stanford Alpaca's model_max_length); longer are cut
    c.data.buckets = (128, 192, 256, 384)  # padded batch lengths below max_length
    c.data.sort_window = 16  # sort windows of this many batches by length (less padding)
    c.data.eval_size = 256  # records held out (fixed random slice) for the response-loss eval
    c.data.limit = 0  # >0: a fixed random subset of this many training records

    c.vera = method_config(VeraConfig, r=1024, targets=TARGETS, d_initial=0.1)
    c.lora = method_config(LoraConfig, r=64, alpha=16.0, targets=TARGETS, dropout=QLORA_DROPOUT[size])

    c.lr = ml_collections.ConfigDict()  # the one place learning rates are set
    c.lr.vera = 4e-3  # VeRA d and b (Table 9)
    c.lr.lora = 4e-4  # LoRA A and B (Table 9)
    c.lr.head = 0.0  # unused: nothing is in model.head
    c.lr.full = 2e-5  # every weight in method=full (Stanford Alpaca's rate)

    c.mt_bench = ml_collections.ConfigDict()  # experiments.mt_bench
    c.mt_bench.questions = "../shared/data/mt_bench/question.jsonl"  # FastChat's MT-Bench questions
    c.mt_bench.max_new_tokens = 1024  # FastChat's gen_model_answer default
    c.mt_bench.batch_size = 8  # questions decoded together (per turn, per greedy/sampled group)
    c.mt_bench.top_k = 50  # HF generate's default, which FastChat's sampling inherits
    c.mt_bench.limit = 0  # >0: only the first N questions of each category

    c.adapter_path = "auto"  # LoRA's dropout needs the factored term; auto picks per layer otherwise
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.weight_decay = 0.0  # Table 9 lists none
    c.num_epochs = 1.0
    c.batch_size = 16  # 4 per step x 4 accumulation steps
    c.grad_accum_steps = 4
    c.eval_batch_size = 16
    c.eval_every = 500  # optimizer steps between held-out loss evals (and at the end)
    c.best_mode = "min"  # heldout/loss
    c.save_adapter = True  # write the trained vectors to workdir/adapter
    c.log_every_steps = 10
    return c
