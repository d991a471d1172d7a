"""What an operator watches: one access-log line per request and Prometheus metrics at /metrics.

    127.0.0.1:50412 "POST /predict" 200 12.4ms 312B
    imgclf_requests_total{method="POST",path="/predict",status="200"} 1234
    imgclf_request_seconds_bucket{path="/predict",le="0.05"} ...
    imgclf_errors_total{status="413",error="too_large"} 3
    imgclf_batch_size_bucket{le="4"} ...      imgclf_in_flight 2

A pure ASGI middleware (not Starlette's BaseHTTPMiddleware) so it sees every reply, the
503s of the concurrency limit and streamed bodies included, and adds no task per request.
The registry is per app: two apps in one process (tests) do not mix.

Hostile clients (issue 22, classes 2 and 3):
- Every metric label a request could choose comes from a closed set: the method is one of the
  standard ones or "other", the path one of the app's routes or "other", the error one of the
  codes serve answers with or "other". A scan of made-up methods and URLs adds no series.
- Every request-derived field of the access line (method, target as sent, forwarded address) goes
  through `untrusted.log_field`: `%0d%0a` in a path cannot forge a line, `%1b` cannot drive a
  terminal. The target is logged as sent (still percent-encoded), not decoded.
- X-Forwarded-For is ignored unless the connection comes from a `--trusted-proxy` address; then
  the client is the rightmost entry that is not itself a trusted proxy, used only if it is a valid
  IP address, and logged as `CLIENT (via PROXY:PORT)`. Anything else keeps the socket's peer.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from imgclf.untrusted import log_field

access_log = logging.getLogger("imgclf.serve.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KNOWN_PATHS = frozenset({"/predict", "/health", "/labels", "/metrics", "/", "/docs", "/docs/oauth2-redirect",
                         "/redoc", "/openapi.json"})
STATIC_DOCS = "/static-offline-docs"  # fastapi-offline's files for /docs and /redoc: one label for all
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"})
# Every code serve answers with (serve, serve._connections, images' decode statuses, net.guard's
# fetch codes as url_*); another one is counted as "other", never as itself.
ERROR_CODES = frozenset({
    "bad_request", "head_timeout", "busy", "internal_error", "invalid_request", "too_large", "body_timeout",
    "bad_multipart", "no_file", "invalid_json", "unsupported_media_type", "client_disconnected", "not_found",
    "method_not_allowed", "http_error", "not_image", "empty", "too_small", "unreadable",
}) | {f"url_{code}" for code in ("invalid_url", "refused", "timeout", "connection_error", "tls_error",
                                  "http_error", "too_many_redirects", "too_large")}


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
    """The `error` field of an error reply's JSON body (every error reply has one), from ERROR_CODES."""
    try:
        code = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        return "unparsed"
    return code if isinstance(code, str) and code in ERROR_CODES else "other"


def _route(path: str) -> str:
    if path in KNOWN_PATHS:
        return path
    if path.startswith(STATIC_DOCS + "/"):
        return STATIC_DOCS
    return "other"


def _method(method: str) -> str:
    return method if method in METHODS else "other"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(proxies: Iterable[str]) -> tuple[Network, ...]:
    """`--trusted-proxy` values (an address or a network) as networks; ValueError names a bad one."""
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in proxies)


def _is_in(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def forwarded_client(scope: Scope, trusted: tuple[Network, ...]) -> str | None:
    """The client address a trusted proxy forwarded, or None (untrusted peer, no valid entry).

    Read right to left: each trusted proxy appends the address it received from, so the rightmost
    entry that is not a trusted proxy is the first one no proxy of ours vouches for."""
    peer = (scope.get("client") or ("", 0))[0]
    if not trusted or not _is_in(peer, trusted):
        return None
    values = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"x-forwarded-for"]
    for entry in reversed(",".join(values)[:2048].split(",")):
        entry = entry.strip()
        if not _is_in(entry, trusted):
            try:
                return str(ipaddress.ip_address(entry))  # only a real address, never free text
            except ValueError:
                return None
    return None


class AccessLog:
    """ASGI middleware: times each HTTP request, logs one line, updates `metrics`."""

    def __init__(self, app: ASGIApp, metrics: Metrics, trusted_proxies: Iterable[str] = ()) -> None:
        self.app, self.metrics = app, metrics
        self.trusted = trusted_networks(trusted_proxies)

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
        self.metrics.requests.labels(_method(method), path, str(status)).inc()
        self.metrics.latency.labels(path).observe(seconds)
        if status >= 400:
            self.metrics.errors.labels(str(status), reply["error"] or "none").inc()
        host, port = scope.get("client") or ("-", 0)
        peer = f"{log_field(str(host), 64)}:{port}"
        forwarded = forwarded_client(scope, self.trusted)
        client = f"{forwarded} (via {peer})" if forwarded else peer
        query = scope.get("query_string", b"")
        raw = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "surrogateescape")
        target = (raw + (b"?" + query if query else b"")).decode("latin-1")  # as sent, percent-escapes kept
        access_log.info('%s "%s %s" %d %.1fms %dB', client, log_field(method, 24), log_field(target), status,
                        seconds * 1000, size)
