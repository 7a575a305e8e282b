"""RoBERTa-base on RTE: 160 epochs, head lr 1e-2, VeRA lr 4e-3 (paper, Table 8)."""

from configs import glue_common


def get_config(arg=None):
    return glue_common.roberta("base", "rte", epochs=160, head_lr=1e-2, vera_lr=4e-3,
                               lora_lr=5e-4, arg=arg)
