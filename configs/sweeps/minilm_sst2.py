"""MiniLM-L6 on the real SST-2 dev set: VeRA, LoRA and the head alone over 3 seeds, each method at
its default learning rate and at higher ones (about 2 CPU minutes per run, 18 runs).

    python -m experiments.sweep run configs/sweeps/minilm_sst2.py
    python -m experiments.sweep report configs/sweeps/minilm_sst2.py
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.module = "experiments.glue"
    c.config = "configs/minilm_sst2.py"
    c.root = "runs/sweeps/minilm_sst2"
    c.fixed = {}
    c.grid = [{"method": ["vera"], "lr.vera": [1e-2, 3e-2, 1e-1]},
              {"method": ["lora"], "lr.lora": [1e-3, 3e-3]},
              {"method": ["head"]}]
    c.seeds = [0, 1, 2]
    return c
