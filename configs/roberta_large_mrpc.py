"""RoBERTa-large on MRPC: 40 epochs, head lr 3e-3, VeRA lr 3e-2 (paper, Table 8)."""

from configs import glue_common


def get_config(arg=None):
    return glue_common.roberta("large", "mrpc", epochs=40, head_lr=3e-3, vera_lr=3e-2,
                               lora_lr=3e-4, arg=arg)
