"""Llama 7B instruction-tuned on alpaca-cleaned (paper, Table 9): VeRA r=1024 lr 4e-3 on every
linear layer but lm_head; `:method=lora` gives r=64 lr 4e-4, alpha 16, dropout 0.1 (QLoRA).

    python -m experiments.instruct --config configs/llama_7b_alpaca.py --workdir runs/llama_7b_alpaca_vera
"""

from configs import instruct_common


def get_config(arg=None):
    c = instruct_common.base_config(arg, size="7b")
    c.model.checkpoint = "huggyllama/llama-7b"
    return c
