"""MiniLM-L6 on all 3,668 real MRPC training examples for 3 epochs (342 steps): VeRA and LoRA at the
learning rates that did best in the SST-2 sweep (configs/sweeps/minilm_sst2.py), 3 seeds.

    python -m experiments.sweep run configs/sweeps/minilm_mrpc_full.py
    python -m experiments.sweep report configs/sweeps/minilm_mrpc_full.py
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.module = "experiments.glue"
    c.config = "configs/minilm_mrpc.py"
    c.root = "runs/sweeps/minilm_mrpc_full"
    c.fixed = {"data": {"train_limit": 0}, "num_epochs": 3}
    c.grid = [{"method": ["vera"], "lr.vera": [3e-2]},
              {"method": ["lora"], "lr.lora": [3e-3]}]
    c.seeds = [0, 1, 2]
    return c
