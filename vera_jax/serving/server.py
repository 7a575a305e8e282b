"""The OpenAI-compatible HTTP server: `create_app` (routes.py, with protocol.py's bodies and
streaming.py's events) and `serve`, which runs it under uvicorn."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from vera_jax.serving.routes import create_app
from vera_jax.serving.streaming import TextStream

__all__ = ["TextStream", "create_app", "serve"]


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **uvicorn_kwargs: Any) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, **uvicorn_kwargs)
