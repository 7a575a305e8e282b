"""Shared math-reasoning config: HF PEFT's MetaMathQA method comparison
(method_comparison/MetaMathQA/default_training_params.json and the experiments'
adapter_config.json / training_params.json): batch 4, 5,000 steps in PEFT's bucketed order, AdamW
(torch's betas and eps), cosine decay with 10% warmup (int(0.1 * steps), as PEFT's scheduler),
gradient clipping 1.0, max_seq_length 768, greedy decoding of at most 300 new tokens (800 in all),
validation on 50 GSM8K train rows every 250 steps, test on the GSM8K test split.

VeRA is PEFT's `vera/llama-3.2-3B-default`: r=256, d_initial 0.1, q_proj/v_proj (PEFT's default
targets for LLaMA), lr 1e-3 and weight decay 0.01 (its training_params.json replaces the whole
optimizer_kwargs, so torch AdamW's default decay applies, not the 0.1 of the defaults). LoRA is
`lora/llama-3.2-3B-rank32`: r=32, alpha 64, no dropout, q_proj/v_proj, lr 1e-4, weight decay 0.1.
PEFT's AdamW decays every trained tensor, so nothing is excluded from decay here.
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg
from vera_jax import LoraConfig, VeraConfig
from vera_jax.tasks.config import method_config, model_config
from vera_jax.train import default_config

TARGETS = ("query", "value")  # q_proj, v_proj
TEMPLATE = "Question: {query} Think step by step.\nAnswer:"  # PEFT's query_template
WEIGHT_DECAY = {"vera": 0.01, "lora": 0.1}  # see the module docstring


def base_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, method="vera", seed=0)
    c = default_config()
    c.seed = a.seed  # VeRA's projections and LoRA's init (the data order is PEFT's, fixed)
    c.method = a.method  # vera | lora
    c.network_timeout = 5.0  # seconds to wait for the Hub before failing with advice

    c.model = model_config()  # checkpoint, tokenizer, head, random_init, overrides, dtype
    c.model.head = ()  # nothing beyond the adapter trains

    c.data = ml_collections.ConfigDict()
    c.data.train = "metamathqa"  # metamathqa | gsm8k (GSM8K's train split without the validation rows)
    c.data.path = ""  # local MetaMathQA JSON array / JSONL of {query, response}; "" reads data.hub_dataset
    c.data.hub_dataset = "meta-math/MetaMathQA"  # PEFT's training data
    c.data.hub_file = "MetaMathQA-395K.json"  # the dataset repo's file, read from the Hub cache without `datasets`
    c.data.revision = ""  # Hub revision of hub_dataset ("": main)
    c.data.gsm8k_dir = "../shared/data/gsm8k"  # openai/grade-school-math's train.jsonl and test.jsonl
    c.data.char_limit = 1300  # PEFT's CHAR_LIMIT on len(f"{query} {response}")
    c.data.template = TEMPLATE  # prompt; the response follows "Answer:" directly
    c.data.max_length = 768  # PEFT's max_seq_length: token ids are cut to it
    c.data.buckets = (128, 192, 256, 320, 384, 512)  # padded batch lengths below max_length (jit shapes)
    c.data.bucket_factor = 20  # PEFT's BUCKET_FACTOR: rows sorted by length in chunks of batch_size x this
    c.data.valid_size = 50  # PEFT's VALID_SIZE GSM8K train rows for validation
    c.data.train_limit = 0  # >0: only the first N filtered training rows
    c.data.test_limit = 0  # >0: only the first N GSM8K test rows (0: the full split, PEFT's test)

    c.decode = ml_collections.ConfigDict()
    c.decode.max_new_tokens = 300  # PEFT's generation_kwargs
    c.decode.max_length = 800  # prompt + new tokens, for PEFT's batch of peft_batch_size prompts
    c.decode.peft_batch_size = 50  # PEFT's batch_size_eval (fixes each prompt's max_length budget)

    c.vera = method_config(VeraConfig, r=256, targets=TARGETS, d_initial=0.1)
    c.lora = method_config(LoraConfig, r=32, alpha=64.0, targets=TARGETS, dropout=0.0)

    c.lr = ml_collections.ConfigDict()  # the one place learning rates are set
    c.lr.vera = 1e-3  # PEFT's vera/llama-3.2-3B-default
    c.lr.lora = 1e-4  # PEFT's default_training_params.json
    c.lr.head = 0.0  # unused: nothing is in model.head
    c.lr.full = 1e-4  # PEFT's default rate, for method=full

    c.num_train_steps = 5000  # PEFT's max_steps
    c.batch_size = 4
    c.eval_batch_size = 50  # PEFT's batch_size_eval
    c.eval_every = 250  # PEFT's eval_steps (validation accuracy)
    c.shuffle = False  # PEFT's order: the data in dataset order, bucketed (the family orders it)
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = c.get_ref("num_train_steps") // 10  # int(0.1 * max_steps)
    c.optimizer.weight_decay = WEIGHT_DECAY.get(a.method, 0.1)
    c.optimizer.weight_decay_exclude = ()  # torch AdamW over model.parameters() decays every trained tensor
    c.optimizer.grad_clip_norm = 1.0
    c.best_mode = "max"  # valid/accuracy
    c.save_adapter = True  # write the trained vectors to workdir/adapter
    c.log_every_steps = 50
    return c
