"""The serve stage's application: `create_app(classifier, options)` -> a FastAPI app.

The routes (POST /predict, GET /health, /labels, /metrics, /docs, /), the body limits and
deadlines per request, and the JSON error replies that the serve package's docstring lists.
`imgclf.serve.run` hands the app to uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
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
from imgclf.inference import Classifier, preprocess_pool
from imgclf.net.guard import FetchFailed, FetchOptions, GuardedFetcher
from imgclf.serve._batching import MicroBatcher
from imgclf.serve._connections import (
    AsciiJSONResponse,
    RouteLimit,
    error_response,
)
from imgclf.serve._observability import AccessLog, Metrics
from imgclf.version import __version__

log = logging.getLogger("imgclf.serve")  # the stage's logger, as before the app had its module

JSON_BODY_LIMIT = 64 * 1024  # a {"url": ...} body; anything bigger is not one


@dataclass(frozen=True)
class ServeOptions:
    # What: the model and the address (`serve.run`; create_app takes the opened classifier instead)
    model: str | Path | None = None  # a run directory, checkpoint, .onnx or TorchScript file
    backend: str = "auto"  # auto: the model file's own (imgclf.inference.OPENERS)
    host: str = "127.0.0.1"
    port: int = 8000
    # How
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
        decoded = decode_image(data, limits, keep_grey=True)  # grey stays grey: a third of the resize work
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
