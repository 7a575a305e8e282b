"""RoBERTa-large on STS-B: 20 epochs, head lr 2e-3, VeRA lr 2e-2 (paper, Table 8)."""

from configs import glue_common


def get_config(arg=None):
    return glue_common.roberta("large", "stsb", epochs=20, head_lr=2e-3, vera_lr=2e-2,
                               lora_lr=2e-4, arg=arg)
