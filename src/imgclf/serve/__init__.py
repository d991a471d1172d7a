"""Serve stage: a model over HTTP with FastAPI and uvicorn.

    imgclf serve --model RUN_DIR --host 127.0.0.1 --port 8000

    POST /predict   an image as multipart field `file`, a raw image body (image/*), or JSON
                    {"url": "https://..."}; `?top_k=5`. Answers {"predictions": [{label, probability}]};
                    a multi-label model {"task": "multilabel", "labels": [{label, score}] (those at or
                    above their thresholds), "top_k": [{label, probability}]}.
    GET  /health    {"status": "ok", ...}        GET /labels   {"labels": [...]}
    GET  /metrics   Prometheus text format       GET /docs     Swagger UI (no CDN)
    GET  /          a page: drop an image, see the top-5

Every request is logged on one line (logger imgclf.serve.access) and counted in /metrics
(requests, latency histogram, errors by code, batch sizes): serve._observability.
The model is whatever `inference.load_classifier` opens (run, checkpoint, ONNX, TorchScript), so
the service preprocesses exactly as training evaluated. Requests that arrive while the model is
busy are classified together in one batch (no added wait), which keeps throughput up under load.

Every error reply, 4xx and 5xx alike, is a JSON body {"error": code, "detail": message} and the
service keeps running: bodies over --max-upload-mb (413), images whose decoding or eval resize
would cost too much (413), content types it cannot read (415), bodies that are not images or URLs
it cannot use (400/422), a body not received within --body-timeout (408), more than
--max-concurrency predictions at once (503). Slow and idle clients are cut by deadlines and never
block /health (see serve._connections). URL fetches have timeouts and a size cap, and refuse
private, loopback and link-local addresses unless --allow-private-urls (see imgclf.net.guard).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from imgclf.errors import ConfigError
from imgclf.inference import load_classifier
from imgclf.serve._app import ServeOptions, create_app
from imgclf.serve._connections import MAX_HEAD_BYTES, guarded_protocol

__all__ = ["ServeOptions", "ServeResult", "create_app", "run", "where_to_open"]

log = logging.getLogger(__name__)


def where_to_open(host: str, port: int) -> str:
    """The log line's address: a wildcard host is where it listens, not an address to open."""
    if host in ("0.0.0.0", "::", ""):
        return f"on all addresses (port {port}); open http://127.0.0.1:{port}/ here, or this machine's address"
    shown = f"[{host}]" if ":" in host else host
    return f"on http://{shown}:{port}/"


@dataclass(frozen=True)
class ServeResult:
    """What `serve.run` returns once the server stopped (Ctrl-C or SIGTERM)."""

    model: str  # what was served (the classifier's source)
    backend: str
    host: str
    port: int

    def summary(self) -> str:
        """Empty: `imgclf serve` says where it listens when it starts (a log line) and prints nothing when it
        stops, so the summary the CLI prints is "" (kept for the one stage contract)."""
        return ""


def run(options: ServeOptions) -> ServeResult:
    """Load `options.model` and serve it on `options.host:port` until interrupted (the request limit is
    `options.max_concurrency`)."""
    import uvicorn

    if options.model is None:
        raise ConfigError("serve: give a model: --model MODEL")
    host, port = options.host, options.port
    classifier = load_classifier(options.model, options.backend)
    app = create_app(classifier, options)
    log.info("serving %s (%s, %d classes) %s", classifier.source, classifier.backend.name,
             len(classifier.class_names), where_to_open(host, port))
    # No uvicorn limit_concurrency: it counts idle connections and then refuses /health too. Each
    # /predict holds its body (up to --max-upload-mb) while it waits, so RouteLimit caps those.
    # proxy_headers=False: uvicorn would otherwise let X-Forwarded-For from loopback replace the
    # client address, unchecked; AccessLog reads it, from --trusted-proxy peers only.
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, proxy_headers=False,
                http=guarded_protocol(options.head_timeout, options.max_connections),
                timeout_keep_alive=options.keep_alive, h11_max_incomplete_event_size=MAX_HEAD_BYTES)
    return ServeResult(str(classifier.source), classifier.backend.name, host, port)
