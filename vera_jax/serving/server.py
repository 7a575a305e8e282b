"""The OpenAI-compatible HTTP server: `create_app` (routes.py, with protocol.py's bodies and
streaming.py's events) and `serve`, which runs it under uvicorn."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI

from vera_jax.serving.routes import create_app
from vera_jax.serving.streaming import TextStream

__all__ = ["TextStream", "create_app", "serve"]


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **uvicorn_kwargs: Any) -> None:
    """Runs `app` until stopped; prints `listening on http://HOST:PORT` once the socket accepts."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **uvicorn_kwargs))

    async def run():
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()
            print(f"listening on http://{host}:{bound[1]}", flush=True)
        await task

    asyncio.run(run())
