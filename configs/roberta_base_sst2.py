"""RoBERTa-base on SST-2: 60 epochs, head lr 4e-3, VeRA lr 4e-3 (paper, Table 8)."""

from configs import glue_common


def get_config(arg=None):
    return glue_common.roberta("base", "sst2", epochs=60, head_lr=4e-3, vera_lr=4e-3,
                               lora_lr=5e-4, arg=arg)
