"""Shared ViT image-classification config: trainer defaults plus the paper's Table 11 recipe
(ViT-B/L pretrained on ImageNet-21k, 10 images per class, 10 epochs, AdamW, linear schedule,
weight decay 0.01).

A dataset file states only its learning rates; `get_config(arg)` of every file accepts
"method=lora,seed=1"-style overrides, e.g. `--config configs/vit_base_cifar100.py:method=lora`.
The paper tunes the head's rate per method, so `lr.head` is a {method: rate} dict the runner
picks from by `config.method`: `--config.method=lora` (as sweeps pass it) gets LoRA's rates too.
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg
from vera_jax import LoraConfig, VeraConfig
from vera_jax.tasks.config import method_config, model_config
from vera_jax.train import default_config

CHECKPOINTS = {"base": "google/vit-base-patch16-224-in21k", "large": "google/vit-large-patch16-224-in21k"}
TFDS_NAMES = {"cifar100": "cifar100", "food101": "food101", "flowers102": "oxford_flowers102", "resisc45": "resisc45"}
METHODS = ("head", "full", "vera", "lora")


def base_config(dataset: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Everything but the checkpoint and the per-dataset learning rates."""
    a = parse_arg(arg, method="vera", seed=0)
    c = default_config()
    c.seed = a.seed  # the k-shot draw (same images for every method), data order, adapter and head init
    c.method = a.method  # vera | lora | full (all weights) | head (classifier only)
    c.network_timeout = 5.0  # seconds to wait for the Hub / tfds hosts before failing with advice

    c.model = model_config()  # checkpoint, head, random_init, overrides
    c.model.checkpoint = ""  # Hub id or local dir (config.json, *.safetensors, preprocessor_config.json)
    c.model.head = ("classifier",)  # modules trained with lr.head in every method (a fresh classifier)

    c.data = ml_collections.ConfigDict()
    c.data.dataset = dataset  # tfds name: cifar100 | food101 | oxford_flowers102 | resisc45 (a label when dir is set)
    c.data.dir = ""  # image folder <root>/{train,test}/<class name>/<image>; "" reads tfds `dataset`
    c.data.tfds_data_dir = ""  # tfds data_dir; "" is tfds' default (~/tensorflow_datasets)
    c.data.download = True  # download and prepare the tfds dataset when missing (needs network; not resisc45)
    c.data.k = 10  # training images per class, drawn by `seed`; 0: the whole train split
    c.data.image_size = 0  # side in pixels; 0: the checkpoint's (224); else position embeddings interpolated

    # Every VeraConfig / LoraConfig field but seed and trainable_extra (from `seed` and `model.head`).
    c.vera = method_config(VeraConfig, r=256, targets=("query", "value"), d_initial=0.1)
    # The paper gives LoRA's rank and targets only; alpha 8 (scale 1) is PEFT's default.
    c.lora = method_config(LoraConfig, r=8, alpha=8.0, targets=("query", "value"))

    c.lr = ml_collections.ConfigDict()  # the one place learning rates are set (the runner maps them to groups)
    c.lr.head = ml_collections.ConfigDict({m: 4e-3 for m in METHODS})  # classifier, per method (Table 11)
    c.lr.vera = 4e-2  # VeRA d and b vectors
    c.lr.lora = 4e-3  # LoRA A and B
    c.lr.full = 4e-5  # every body weight in method=full

    c.optimizer.weight_decay = 0.01  # AdamW (Table 11); biases and norms excluded
    c.optimizer.schedule = "linear"  # linear decay to 0 (Table 11)
    # The paper states no batch size or warmup. Our choice: 32 images per step (31 steps per epoch
    # on CIFAR100's 1,000 images; the remainder, a different one each epoch, is dropped) and 6% warmup.
    c.optimizer.warmup_ratio = 0.06  # linear warmup over the first 6% of steps (our choice, above)
    c.batch_size = 32  # images per optimizer step (our choice, above)
    c.eval_batch_size = 128  # images per eval step
    c.num_epochs = 10.0  # Table 11
    c.save_adapter = True  # write the trained vectors + head to workdir/adapter (vera_jax.save_adapter)
    c.log_every_steps = 10  # train loss/accuracy to metrics.jsonl every N steps
    return c


def vit(size: str, dataset: str, *, head: float, full: tuple[float, float], vera: tuple[float, float],
        lora: tuple[float, float], arg: str | None = None) -> ml_collections.ConfigDict:
    """ViT-{base,large} on `dataset` (cifar100 | food101 | flowers102 | resisc45) with Table 11's
    rates: `head` for head-only, and (body or adapter, head) for full, vera and lora."""
    c = base_config(TFDS_NAMES[dataset], arg)
    c.model.checkpoint = CHECKPOINTS[size]
    c.lr.full, c.lr.vera, c.lr.lora = full[0], vera[0], lora[0]
    c.lr.head = ml_collections.ConfigDict({"head": head, "full": full[1], "vera": vera[1], "lora": lora[1]})
    return c
