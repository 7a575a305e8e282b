"""MiniLM-L6 on the real CoLA files, sized for a 2-core CPU (see glue_common.minilm)."""

from configs import glue_common


def get_config(arg=None):
    return glue_common.minilm("cola", epochs=3, train_limit=2000, arg=arg)
