"""MiniLM-L6 on the real SST-2 files, sized for a 2-core CPU (see glue_common.minilm). SST-2's
sentences are short (most fit the 32-token bucket), so this is the quickest real task to learn."""

from configs import glue_common


def get_config(arg=None):
    return glue_common.minilm("sst2", epochs=2, train_limit=2000, arg=arg)
