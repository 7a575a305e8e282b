"""Issue 23 on E2E: the real SmolLM2-135M-Instruct (configs/smollm2_e2e.py) at 4x the steps of the
RESULTS.md rows: a fixed random 1,600 training pairs (`data.train_limit`, drawn as the 400 were),
one epoch = 200 steps of batch 8, the same 40 test MRs and beam search. VeRA at the rate
that did best at 50 steps (1e-1), LoRA at its rate there (2e-3); one seed (each run is tens of CPU
minutes).

    python -m experiments.sweep run configs/sweeps/gap_smollm2_e2e.py
    python -m experiments.sweep report configs/sweeps/gap_smollm2_e2e.py
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.module = "experiments.e2e"
    c.config = "configs/smollm2_e2e.py"
    c.root = "runs/sweeps/gap_smollm2_e2e"
    c.fixed = {"data": {"train_limit": 1600}}
    c.grid = [{"method": ["vera"], "lr.vera": [1e-1]},
              {"method": ["lora"], "lr.lora": [2e-3]}]
    c.seeds = [0]
    return c
