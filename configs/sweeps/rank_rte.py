"""The paper's Figure 2 on the real RTE files: dev accuracy against rank for VeRA and LoRA
(MiniLM-L6 here, RoBERTa with `:roberta_large`), 5 seeds, median.

    python -m experiments.sweep run configs/sweeps/rank_rte.py[:roberta_large] [--workers 2]
    python -m experiments.sweep report configs/sweeps/rank_rte.py --plot-x vera.r,lora.r
"""

import ml_collections


def get_config(arg="minilm"):
    if arg not in ("minilm", "roberta_large"):
        raise ValueError(f"rank_rte sweep arg: {arg!r} is not one of ['minilm', 'roberta_large']")
    c = ml_collections.ConfigDict()
    c.module = "experiments.glue"
    c.config = f"configs/{arg}_rte.py"
    c.root = f"runs/sweeps/rank_rte_{arg}"
    c.fixed = {}
    c.grid = [{"method": ["vera"], "vera.r": [16, 64, 256, 1024]},
              {"method": ["lora"], "lora.r": [1, 2, 4, 8, 16]}]
    c.seeds = [0, 1, 2, 3, 4]
    return c
