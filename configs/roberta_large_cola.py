"""RoBERTa-large on CoLA: 40 epochs, head lr 6e-3, VeRA lr 1e-2 (paper, Table 8)."""

from configs import glue_common


def get_config(arg=None):
    return glue_common.roberta("large", "cola", epochs=40, head_lr=6e-3, vera_lr=1e-2,
                               lora_lr=2e-4, arg=arg)
