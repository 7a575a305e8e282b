"""The paper's Table 5 grid: ViT-B/L x CIFAR100, Food101, Flowers102, RESISC45 x head, full, LoRA,
VeRA x 5 seeds (160 runs), each with its config file's Table 11 rates. For a Cloud TPU VM:

    python -m experiments.sweep commands configs/sweeps/vit_paper.py --format tpu --tpu NAME --zone ZONE
    python -m experiments.sweep report configs/sweeps/vit_paper.py   # median over seeds of the best top-1

The seed also draws the 10 images per class, so every method at one seed sees the same images.
RESISC45 needs its manual download in the tfds data dir first (tfds cannot fetch it).
"""

import ml_collections

MODELS = ("base", "large")
DATASETS = ("cifar100", "food101", "flowers102", "resisc45")


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.module = "experiments.vit"  # python -m <module> for every run
    c.config = "configs/vit_base_cifar100.py"  # default --config; the grid's "config" key sets each run's
    c.root = "runs/sweeps/vit_paper"  # one workdir per run under it
    c.fixed = {}  # overrides of every run (e.g. {"data": {"tfds_data_dir": "gs://bucket/tfds"}})
    c.grid = [{"config": [f"configs/vit_{m}_{d}.py" for m in MODELS for d in DATASETS],  # Table 11 rates per file
               "method": ["head", "full", "lora", "vera"]}]  # lr.head is picked per method by the runner
    c.seeds = [0, 1, 2, 3, 4]  # crossed with every grid point; the report takes medians over them
    return c
