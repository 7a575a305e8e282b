"""Optional dependencies: what only some users need is an extra of the package (setup.cfg), and a
feature used without its extra fails naming the command that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {  # extra -> the feature it enables (the packages are setup.cfg's)
    "serving": "the OpenAI-compatible HTTP server (python -m vera_jax.serving)",
    "nlg": "the E2E NLG metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr)",
    "gguf": "reading llama.cpp .gguf checkpoints",
}


def missing(extra: str, error: ModuleNotFoundError) -> ImportError:
    """The error to raise when `error` (a failed import) means the extra is not installed."""
    return ImportError(f"{EXTRAS[extra]} needs {error.name!r}, which is not installed; install the "
                       f"{extra!r} extra: pip install \"vera_jax[{extra}]\"")


def require(module: str, extra: str) -> ModuleType:
    """`module`, imported; without it, an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise missing(extra, e) from e
