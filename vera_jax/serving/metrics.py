"""What the server counts and logs: Prometheus metrics on a per-app registry (`/metrics`), one
structured access-log line per request (never the prompt), and `Guard`, the outermost middleware
that enforces the body limit and answers any unhandled error itself.

Guard answers an exception that escaped the routes with a 500 in OpenAI's body and does NOT
re-raise it: Starlette's `ServerErrorMiddleware` re-raises after answering, and uvicorn then
closes the connection, so the client's next request on that keep-alive connection was reset.
"""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from vera_jax.serving.protocol import error_body

ACCESS_LOG = logging.getLogger("vera_jax.serving.access")
ERROR_LOG = logging.getLogger("vera_jax.serving")
CLIENT_GONE = 499                     # nginx's status for a request whose client closed the connection
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """The server's Prometheus metrics; engine and bank gauges are read when scraped."""

    def __init__(self, engine, bank):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vera_requests", "HTTP requests by route, status and adapter",
                                ["route", "status", "adapter"], registry=r)
        self.prompt_tokens = Counter("vera_prompt_tokens", "prompt tokens of finished requests", ["adapter"],
                                     registry=r)
        self.completion_tokens = Counter("vera_completion_tokens", "generated tokens of finished requests",
                                         ["adapter"], registry=r)
        self.ttft = Histogram("vera_time_to_first_token_seconds", "admission to first generated token",
                              buckets=_SECONDS, registry=r)
        self.latency = Histogram("vera_request_latency_seconds", "HTTP request latency by route", ["route"],
                                 buckets=_SECONDS, registry=r)
        Gauge("vera_queue_depth", "requests waiting for a slot", registry=r).set_function(
            lambda: engine.stats()["queued"])
        Gauge("vera_active_slots", "slots decoding a request", registry=r).set_function(
            lambda: engine.stats()["active"])
        Gauge("vera_slots", "slots of the engine", registry=r).set(engine.slots)
        Gauge("vera_adapters_resident", "adapters loaded in the bank", registry=r).set_function(
            lambda: len(bank.names()))
        Gauge("vera_bank_bytes", "device bytes of the bank's projections and stacked vectors", registry=r
              ).set_function(lambda: sum(g["projection_bytes"] + g["stacked_bytes"] for g in bank.stats()["groups"]))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BodyTooLarge(HTTPException):
    """Raised while the body is read (FastAPI re-raises HTTPExceptions from body reading as they are)."""


class Guard:
    """Pure ASGI middleware: body limit (413), unhandled errors (500, connection kept), metrics and
    the access log. Routes put `adapter`, `prompt_tokens`, `completion_tokens` in `request.state`."""

    def __init__(self, app, *, max_body_bytes: int, metrics: Metrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, state = time.monotonic(), scope.setdefault("state", {})
        status, seen = [None], [0]
        limit = self.max_body_bytes
        too_large = f"body: larger than {limit} bytes (--max-body-bytes)"

        async def limited():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise BodyTooLarge(413, too_large)
            return message

        async def watched(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if length.isdigit() and int(length) > limit:
                await self._answer(watched, 413, too_large, "invalid_request_error")
            else:
                await self.app(scope, limited, watched)
        except Exception as exc:  # noqa: BLE001 (answered here, so the connection stays usable)
            ERROR_LOG.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if status[0] is None:
                await self._answer(watched, 500, f"internal error ({type(exc).__name__}); see the server log",
                                   "server_error")
        finally:
            self._record(scope, state, status[0] or CLIENT_GONE, time.monotonic() - start)

    @staticmethod
    async def _answer(send, status: int, message: str, kind: str) -> None:
        body = json.dumps(error_body(status, message, None, kind)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _record(self, scope, state: dict, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "other"
        adapter = state.get("adapter", "")
        m = self.metrics
        m.requests.labels(route, str(status), adapter).inc()
        m.latency.labels(route).observe(seconds)
        if "prompt_tokens" in state:
            m.prompt_tokens.labels(adapter).inc(state["prompt_tokens"])
            m.completion_tokens.labels(adapter).inc(state.get("completion_tokens", 0))
        ACCESS_LOG.info(json.dumps({"method": scope["method"], "route": route, "status": status, "adapter": adapter,
                                    "prompt_tokens": state.get("prompt_tokens"),
                                    "completion_tokens": state.get("completion_tokens"),
                                    "latency_s": round(seconds, 4)}))
