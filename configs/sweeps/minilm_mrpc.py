"""MiniLM-L6 on the real MRPC dev set: VeRA vs LoRA over 3 seeds, a few CPU minutes per run.

    python -m experiments.sweep run configs/sweeps/minilm_mrpc.py
    python -m experiments.sweep report configs/sweeps/minilm_mrpc.py
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.module = "experiments.glue"  # python -m <module> for every run
    c.config = "configs/minilm_mrpc.py"  # its --config
    c.root = "runs/sweeps/minilm_mrpc"  # one workdir per run under it
    c.fixed = {"num_epochs": 2}  # overrides of every run
    c.grid = [{"method": ["vera", "lora"]}]  # union of cartesian products
    c.seeds = [0, 1, 2]  # crossed with every grid point; the report takes medians over them
    return c
