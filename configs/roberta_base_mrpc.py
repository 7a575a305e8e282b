"""RoBERTa-base on MRPC: 30 epochs, head lr 4e-3, VeRA lr 1e-2 (paper, Table 8)."""

from configs import glue_common


def get_config(arg=None):
    return glue_common.roberta("base", "mrpc", epochs=30, head_lr=4e-3, vera_lr=1e-2,
                               lora_lr=4e-4, arg=arg)
