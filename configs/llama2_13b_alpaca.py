"""Llama 2 13B instruction-tuned on alpaca-cleaned (paper, Table 9): VeRA r=1024 lr 4e-3 on every
linear layer but lm_head; `:method=lora` gives r=64 lr 4e-4, alpha 16, dropout 0.05 (QLoRA).

    python -m experiments.instruct --config configs/llama2_13b_alpaca.py --workdir runs/llama2_13b_alpaca_vera
"""

from configs import instruct_common


def get_config(arg=None):
    c = instruct_common.base_config(arg, size="13b")
    c.model.checkpoint = "meta-llama/Llama-2-13b-hf"
    return c
