"""RoBERTa-base on CoLA: 80 epochs, head lr 1e-2, VeRA lr 1e-2 (paper, Table 8)."""

from configs import glue_common


def get_config(arg=None):
    return glue_common.roberta("base", "cola", epochs=80, head_lr=1e-2, vera_lr=1e-2,
                               lora_lr=4e-4, arg=arg)
