"""GPT-2 Medium on E2E NLG with VeRA (paper, Table 10: lr 1e-1, r=1024 on query/value, 5 epochs);
`:method=lora` gives the LoRA paper's r=4, alpha=32, dropout 0.1, lr 2e-4."""

from configs import e2e_common


def get_config(arg=None):
    c = e2e_common.base_config(arg)
    c.model.checkpoint = "gpt2-medium"
    return c
