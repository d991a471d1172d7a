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

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from imgclf.images import ImageLimits, Rejected, decode_image
from imgclf.inference import Classifier, load_classifier, preprocess_pool
from imgclf.net.guard import FetchFailed, FetchOptions, GuardedFetcher
from imgclf.serve._batching import MicroBatcher
from imgclf.serve._connections import (
    MAX_HEAD_BYTES,
    AsciiJSONResponse,
    RouteLimit,
    error_response,
    guarded_protocol,
)
from imgclf.serve._observability import AccessLog, Metrics
from imgclf.version import __version__

log = logging.getLogger(__name__)

JSON_BODY_LIMIT = 64 * 1024  # a {"url": ...} body; anything bigger is not one


@dataclass(frozen=True)
class ServeOptions:
    max_upload_bytes: int = 10 * 1024 * 1024
    fetch: FetchOptions = field(default_factory=lambda: FetchOptions(total_timeout=10.0))
    max_batch: int = 16
    prep_threads: int = 4  # decoding and preprocessing, alongside the model's thread
    # Intra-op threads of a torch model; 0: half the cores. Measured on 2 cores (benchmarks.md, serve):
    # with both cores the model's threads spin while small batches wait and take the cores that decode
    # the next requests (311 requests/s at 16 clients); with one, 526.
    model_threads: int = 0
    limits: ImageLimits = ImageLimits(max_pixels=40_000_000, min_side=1)
    max_concurrency: int = 64  # POST /predict requests at once; more get 503 (others are never limited)
    head_timeout: float = 10.0  # seconds for a request line + headers, from connect or the last response
    body_timeout: float = 60.0  # seconds for a whole request body
    keep_alive: int = 5  # seconds an idle keep-alive connection stays open between requests
    max_connections: int = 1024  # open connections; past it the one idle longest is closed
    # Addresses or networks of reverse proxies whose X-Forwarded-For names the client in the access
    # log; empty: the header is ignored (anyone can send it). See serve._observability.
    trusted_proxies: tuple[str, ...] = ()


class ApiError(Exception):
    """A client error: becomes {"error": code, "detail": message} with this status."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class LabelScore(BaseModel):
    label: str
    probability: float


class PredictResponse(BaseModel):
    predictions: list[LabelScore]
    source: str  # "upload" or the fetched URL
    model: str


class TagScore(BaseModel):
    label: str
    score: float


class MultilabelResponse(BaseModel):
    """A multi-label model's answer: the labels at or above their thresholds, and the top-k scores."""

    task: str = "multilabel"
    labels: list[TagScore]
    top_k: list[LabelScore]
    source: str
    model: str


class UrlRequest(BaseModel):
    url: str


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """Pass the body through, failing with 413 as soon as it exceeds `limit` (chunked bodies too)."""
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"request body exceeds the {limit} byte limit")
        yield chunk


async def _read_body(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in _limited(request.stream(), limit)])


async def _within(seconds: float, reading: Any) -> Any:
    """The body read, cut after `seconds` in all (a client sending a byte a second is not idle)."""
    try:
        async with asyncio.timeout(seconds):
            return await reading
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"request body not received within {seconds:g} s") from None


def _check_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"request body of {declared} bytes exceeds the {limit} byte limit")


async def _upload_bytes(request: Request, limit: int) -> bytes:
    parser = MultiPartParser(request.headers, _limited(request.stream(), limit), max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise ApiError(400, "bad_multipart", err.message) from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ApiError(422, "no_file", "multipart body needs an image in the field 'file'")
    try:
        return await upload.read()
    finally:
        await upload.close()


def _url_from_json(body: bytes) -> str:
    try:
        return UrlRequest.model_validate_json(body).url
    except ValueError:
        raise ApiError(422, "invalid_json", 'JSON body must be {"url": "http(s)://..."}') from None


_FETCH_STATUS = {"invalid_url": 422, "refused": 403, "too_large": 413}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


def create_app(classifier: Classifier, options: ServeOptions = ServeOptions()) -> FastAPI:
    """The ASGI app; tests and embedders can serve it with any ASGI server."""
    metrics = Metrics()
    batcher = MicroBatcher(classifier, options.max_batch, on_batch=metrics.observe_batch)
    fetcher = GuardedFetcher(options.fetch)
    prep = preprocess_pool(options.prep_threads, classifier)
    classifier.set_model_threads(options.model_threads or max(1, (os.cpu_count() or 1) // 2))
    # Refuse, from the header, what the eval resize would blow up (images.ImageLimits.for_resize).
    limits = options.limits.for_resize(classifier.preprocessing.resize_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        async with fetcher:
            yield
        await batcher.stop()
        prep.shutdown(wait=False)

    # FastAPIOffline: Swagger UI (/docs) and ReDoc (/redoc) from files in the package, not a CDN,
    # so the API pages work on an air-gapped server.
    app = FastAPIOffline(title="imgclf", version=__version__, lifespan=lifespan,
                         default_response_class=AsciiJSONResponse,
                         description=f"Image classifier ({len(classifier.class_names)} classes) served by imgclf.")
    # Only the routes that do real work are limited: /health must answer while /predict is full.
    app.add_middleware(RouteLimit, limit=options.max_concurrency, paths=("/predict",))
    # Added last, so outermost: it times and logs every reply, the limit's 503s included.
    app.add_middleware(AccessLog, metrics=metrics, trusted_proxies=options.trusted_proxies)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        # close: the body may be unread (413, 408); the client reconnects for its next request.
        return error_response(err.status, err.code, err.detail, {"connection": "close"})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}"[:300])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, _HTTP_CODES.get(err.status_code, "http_error"), str(err.detail),
                              dict(err.headers or {}))

    async def _image_bytes(request: Request) -> tuple[bytes, str]:
        _check_length(request, options.max_upload_bytes)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        deadline = options.body_timeout
        if ctype == "multipart/form-data":
            return await _within(deadline, _upload_bytes(request, options.max_upload_bytes)), "upload"
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return await _within(deadline, _read_body(request, options.max_upload_bytes)), "upload"
        if ctype == "application/json":
            url = _url_from_json(await _within(deadline, _read_body(request, JSON_BODY_LIMIT)))
            fetched = await fetcher.fetch(url)
            if isinstance(fetched, FetchFailed):
                raise ApiError(_FETCH_STATUS.get(fetched.code, 422), f"url_{fetched.code}", fetched.reason)
            return fetched.data, url
        raise ApiError(415, "unsupported_media_type",
                       "send multipart/form-data (field 'file'), an image/* body, or JSON {\"url\": ...}")

    def _decode_and_transform(data: bytes) -> np.ndarray:
        decoded = decode_image(data, limits)
        if isinstance(decoded, Rejected):
            raise ApiError(413 if decoded.status == "too_large" else 400, decoded.status, decoded.reason)
        return classifier.prepare(decoded.image)

    @app.post("/predict", response_model=PredictResponse | MultilabelResponse, openapi_extra=_PREDICT_BODY_DOC,
              summary="Classify one image (upload, raw body, or URL)")
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=1000)) -> PredictResponse | MultilabelResponse:
        try:
            data, source = await _image_bytes(request)
        except ClientDisconnect:
            raise ApiError(400, "client_disconnected", "the client closed the connection mid-body") from None
        image = await asyncio.get_running_loop().run_in_executor(prep, _decode_and_transform, data)
        probs = await batcher.probabilities(image)
        [(top, chosen)] = classifier.outputs(probs[None, :], top_k)
        scores = [LabelScore(label=lbl, probability=p) for lbl, p in top]
        if chosen is not None:
            return MultilabelResponse(labels=[TagScore(label=lbl, score=p) for lbl, p in chosen], top_k=scores,
                                      source=source, model=classifier.source)
        return PredictResponse(predictions=scores, source=source, model=classifier.source)

    @app.get("/metrics", summary="Prometheus metrics: requests, latency, errors by code, batch sizes",
             response_class=PlainTextResponse)
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/health", summary="Liveness and what is loaded")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": classifier.source, "backend": classifier.backend.name,
                "classes": len(classifier.class_names), "image_size": classifier.preprocessing.image_size,
                "version": __version__} | ({"task": "multilabel"} if classifier.multilabel else {})

    @app.get("/labels", summary="Class names, in the model's output order (and a multi-label model's thresholds)")
    async def labels() -> dict[str, list[Any]]:
        extra = {"thresholds": list(classifier.thresholds)} if classifier.thresholds is not None else {}
        return {"labels": list(classifier.class_names)} | extra

    page = resources.files("imgclf").joinpath("_static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


_BINARY = {"type": "string", "format": "binary"}
_ERROR_EXAMPLES = (
    ("400", "not an image", "not_image", "html document"),
    ("403", "URL refused (SSRF protection)", "url_refused", "127.0.0.1 is a loopback address"),
    ("408", "request body not received in time", "body_timeout", "request body not received within 60 s"),
    ("413", "body or image too large", "too_large", "request body exceeds the 10485760 byte limit"),
    ("415", "unsupported content type", "unsupported_media_type", "send multipart/form-data ..."),
    ("422", "bad request, or a URL that cannot be fetched", "url_http_error", "HTTP 404 from ..."),
    ("500", "the server failed on this request", "internal_error", "the server failed on this request; ..."),
    ("503", "too many predictions at once; retry", "busy", "the service is handling its limit of 64 ..."),
)
_PREDICT_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                               "properties": {"file": _BINARY}}},
            "application/json": {"schema": {"type": "object", "required": ["url"],
                                            "properties": {"url": {"type": "string", "format": "uri"}}}},
            "image/*": {"schema": _BINARY},
        },
    },
    "responses": {code: {"description": what,
                         "content": {"application/json": {"example": {"error": err, "detail": detail}}}}
                  for code, what, err, detail in _ERROR_EXAMPLES},
}


def where_to_open(host: str, port: int) -> str:
    """The log line's address: a wildcard host is where it listens, not an address to open."""
    if host in ("0.0.0.0", "::", ""):
        return f"on all addresses (port {port}); open http://127.0.0.1:{port}/ here, or this machine's address"
    shown = f"[{host}]" if ":" in host else host
    return f"on http://{shown}:{port}/"


def run(model: str, backend: str = "auto", host: str = "127.0.0.1", port: int = 8000,
        options: ServeOptions = ServeOptions(), max_concurrency: int | None = None) -> int:
    """Load the model and serve it until interrupted."""
    import uvicorn

    if max_concurrency is not None:
        options = replace(options, max_concurrency=max_concurrency)
    classifier = load_classifier(model, backend)
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
    return 0
