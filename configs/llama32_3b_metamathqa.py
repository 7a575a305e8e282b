"""HF PEFT's MetaMathQA -> GSM8K method comparison on Llama-3.2-3B (base), for a GPU: VeRA as
PEFT's `vera/llama-3.2-3B-default` (35.4% GSM8K test accuracy in PEFT's results, L40S),
`:method=lora` as `lora/llama-3.2-3B-rank32` (47.8%). Writes workdir/results.json in PEFT's layout.

    python -m experiments.math --config configs/llama32_3b_metamathqa.py --workdir runs/math_vera
    python -m experiments.math --config configs/llama32_3b_metamathqa.py:method=lora --workdir runs/math_lora
    python -m experiments.math --config configs/llama32_3b_metamathqa.py \
        --config.data.path=/path/to/MetaMathQA-395K.json --config.model.checkpoint=/path/to/Llama-3.2-3B

The base model is held in bfloat16 as PEFT's `dtype: bfloat16`; the adapter trains in float32 on
the factored path (the update is never rounded into a bfloat16 kernel).
"""

from configs import math_common


def get_config(arg=None):
    c = math_common.base_config(arg)
    c.model.checkpoint = "meta-llama/Llama-3.2-3B"  # PEFT's model_id
    c.model.dtype = "bfloat16"
    c.compute_dtype = "bfloat16"
    c.adapter_path = "factored"
    c.checkpoint_every_steps = 1000
    return c
