"""Issue 23 on MRPC: the VeRA setting that came within 1 point of LoRA on SST-2 (r=128 on q,k,v and
the attention output, 12,288 adapter parameters, 1/6 of LoRA r=8 q,v's 73,728), on all 3,668 real
MRPC training pairs for 3 epochs (342 steps), 3 seeds. The reference rows (VeRA q,v r=256 and LoRA
r=8 q,v at the same data, epochs and seeds) are configs/sweeps/minilm_mrpc_full.py.

    python -m experiments.sweep run configs/sweeps/gap_minilm_mrpc.py
    python -m experiments.sweep report configs/sweeps/gap_minilm_mrpc.py
"""

import ml_collections

QKVO = ["query", "key", "value", "attn_out"]  # attn_out: our models' attention output projection


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.module = "experiments.glue"
    c.config = "configs/minilm_mrpc.py"
    c.root = "runs/sweeps/gap_minilm_mrpc"
    c.fixed = {"data": {"train_limit": 0}, "num_epochs": 3}
    c.grid = [{"method": ["vera"], "vera.targets": [QKVO], "vera.r": [128], "lr.vera": [3e-2]}]
    c.seeds = [0, 1, 2]
    return c
