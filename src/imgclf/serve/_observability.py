"""What an operator watches: one access-log line per request and Prometheus metrics at /metrics.

    127.0.0.1:50412 "POST /predict" 200 12.4ms 312B
    imgclf_requests_total{method="POST",path="/predict",status="200"} 1234
    imgclf_request_seconds_bucket{path="/predict",le="0.05"} ...
    imgclf_errors_total{status="413",error="too_large"} 3
    imgclf_batch_size_bucket{le="4"} ...      imgclf_in_flight 2

A pure ASGI middleware (not Starlette's BaseHTTPMiddleware) so it sees every reply, the
503s of the concurrency limit and streamed bodies included, and adds no task per request.
Paths are labelled by route, never by the raw URL, so a scan of random URLs cannot grow the
metric set without bound. The registry is per app: two apps in one process (tests) do not mix.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

access_log = logging.getLogger("imgclf.serve.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KNOWN_PATHS = ("/predict", "/health", "/labels", "/metrics", "/", "/docs", "/redoc", "/openapi.json")


class Metrics:
    """The service's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("imgclf_requests", "HTTP requests answered", ["method", "path", "status"],
                                registry=self.registry)
        self.latency = Histogram("imgclf_request_seconds", "time from request to the end of the reply", ["path"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.errors = Counter("imgclf_errors", "error replies by HTTP status and imgclf error code",
                              ["status", "error"], registry=self.registry)
        self.batch_size = Histogram("imgclf_batch_size", "images per model call (micro-batching)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.in_flight = Gauge("imgclf_in_flight", "requests being served now", registry=self.registry)

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _error_code(body: bytes) -> str:
    """The `error` field of an error reply's JSON body (every error reply has one), bounded."""
    try:
        code = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        return "unparsed"
    return code[:40] if isinstance(code, str) and code.replace("_", "").isalnum() else "unparsed"


def _route(path: str) -> str:
    if path in KNOWN_PATHS or path.startswith("/docs") or path.startswith("/redoc"):
        return path
    return "other"


class AccessLog:
    """ASGI middleware: times each HTTP request, logs one line, updates `metrics`."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        reply: dict[str, Any] = {"status": 500, "bytes": 0, "error": ""}

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                reply["status"] = int(message["status"])
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if reply["status"] >= 400 and not reply["bytes"]:
                    reply["error"] = _error_code(body)
                reply["bytes"] += len(body)
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.in_flight.dec()
            self._record(scope, reply, time.perf_counter() - started)

    def _record(self, scope: Scope, reply: dict[str, Any], seconds: float) -> None:
        status, size = reply["status"], reply["bytes"]
        path = _route(scope.get("path", ""))
        method = scope.get("method", "")
        self.metrics.requests.labels(method, path, str(status)).inc()
        self.metrics.latency.labels(path).observe(seconds)
        if status >= 400:
            self.metrics.errors.labels(str(status), reply["error"] or "none").inc()
        client = scope.get("client") or ("-", 0)
        query = scope.get("query_string", b"").decode("latin-1")
        target = scope.get("path", "") + (f"?{query}" if query else "")
        access_log.info('%s:%s "%s %s" %d %.1fms %dB', client[0], client[1], method, target[:200], status,
                        seconds * 1000, size)
