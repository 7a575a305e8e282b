"""RoBERTa-large on RTE: 40 epochs, head lr 2e-3, VeRA lr 2e-2 (paper, Table 8)."""

from configs import glue_common


def get_config(arg=None):
    return glue_common.roberta("large", "rte", epochs=40, head_lr=2e-3, vera_lr=2e-2,
                               lora_lr=4e-4, arg=arg)
