"""Reachability probes, so a reader of remote files (a dataset, a Hub checkpoint) fails at once
offline with advice instead of hanging: below both the data readers and the model loader."""

from __future__ import annotations

import socket
import urllib.parse
from typing import Optional


def reachable(url: str, timeout: float) -> Optional[str]:
    """None when a TCP connection to the URL's host opens within `timeout` s, else the reason."""
    parts = urllib.parse.urlparse(url)
    try:
        socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{parts.hostname}: {e}"


def hub_unreachable(timeout: float) -> Optional[str]:
    """None when the Hugging Face Hub can be downloaded from, else why not (HF_HUB_OFFLINE, or
    its host does not answer within `timeout` s)."""
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else reachable(constants.ENDPOINT, timeout)
