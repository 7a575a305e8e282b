"""GPT-2 Large on E2E NLG with VeRA (paper, Table 10: lr 2e-2, r=1024 on query/value, 5 epochs);
`:method=lora` gives the LoRA paper's settings."""

from configs import e2e_common


def get_config(arg=None):
    c = e2e_common.base_config(arg)
    c.model.checkpoint = "gpt2-large"
    c.lr.vera = 2e-2
    return c
