"""RoBERTa-large on QNLI: 20 epochs, head lr 2e-4, VeRA lr 1e-2 (paper, Table 8)."""

from configs import glue_common


def get_config(arg=None):
    return glue_common.roberta("large", "qnli", epochs=20, head_lr=2e-4, vera_lr=1e-2,
                               lora_lr=2e-4, arg=arg)
