"""What serve does about slow, idle and greedy clients: the defences uvicorn does not have.

uvicorn arms no timer until a connection has answered one request, so a client that connects and
sends nothing, or sends its request head one byte a second, holds a connection for ever; its
`limit_concurrency` counts such connections and then answers *everyone*, /health included, with a
plain-text 503. Here instead:

- `guarded_protocol`: uvicorn's h11 protocol plus a deadline for each request head (the request
  line and headers must be complete `head_timeout` seconds after the connection opened or the
  previous response ended; the deadline does not move when a byte arrives, so a trickle cannot
  hold it), and a cap on open connections (when a new one would pass it, the connection that has
  waited longest for a request head is closed). Protocol-level errors (a malformed request, a head
  over the size limit, the deadline) are answered in the JSON shape of every other error.
- `RouteLimit`: at most `limit` requests at once on the routes that do real work (POST /predict);
  more get an immediate JSON 503 with Retry-After. /health, /labels, /docs and the page are never
  limited, so a service full of slow uploads still answers its health check at once.
- `error_response`: the one JSON error shape, {"error": code, "detail": message}, ASCII-escaped so
  a detail holding any text (a URL with lone surrogates) always encodes.

The body-read deadline lives in the app's own body reader (serve._read_body), which knows the body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import h11
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from imgclf.untrusted import log_field

log = logging.getLogger("imgclf.serve")

MAX_HEAD_BYTES = 16 * 1024  # request line + headers (h11's incomplete-event limit)


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: any str encodes, lone surrogates included (Starlette's default
    writes raw UTF-8 and fails on them with a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_body(code: str, detail: str) -> bytes:
    return json.dumps({"error": code, "detail": detail}, ensure_ascii=True).encode("ascii")


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return AsciiJSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _raw_reply(status: int, reason: str, code: str, detail: str) -> bytes:
    """A complete HTTP/1.1 error reply, written straight to the socket (no request to answer yet)."""
    body = error_body(code, detail)
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a cap on open connections.

    Configured by `guarded_protocol` (class attributes), since uvicorn builds one per connection.
    """

    head_timeout: float = 10.0
    max_connections: int = 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._waiting_since = time.monotonic()
        self._evict_if_full()
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._waiting_since = time.monotonic()
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own reply to a malformed request, or a head over MAX_HEAD_BYTES, is plain text.
        if not self.transport.is_closing():
            self.transport.write(_raw_reply(400, "Bad Request", "bad_request", f"{msg} (or a request head over "
                                                                                f"{MAX_HEAD_BYTES} bytes)"))
            self.transport.close()

    # ---- the request-head deadline ------------------------------------------------------------
    def waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _watch_head(self) -> None:
        if not self.waiting_for_head():
            self._cancel_head_timer()
        elif self._head_timer is None and not self.transport.is_closing():
            # Armed once per wait: bytes arriving do not move the deadline.
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self.waiting_for_head():
            return
        partial, _ = self.conn.trailing_data
        if partial:  # a client that is sending, too slowly: tell it why
            self.transport.write(_raw_reply(408, "Request Timeout", "head_timeout",
                                            f"request line and headers not complete within {self.head_timeout:g} s"))
        self.transport.close()

    # ---- the connection cap -------------------------------------------------------------------
    def _evict_if_full(self) -> None:
        if len(self.connections) <= self.max_connections:
            return
        idle = [c for c in self.connections
                if c is not self and isinstance(c, GuardedH11Protocol) and c.waiting_for_head()
                and not c.transport.is_closing()]
        if idle:
            oldest = min(idle, key=lambda c: c._waiting_since)
            log.warning("%d connections open: closing the one idle longest", len(self.connections))
            oldest.transport.close()


def guarded_protocol(head_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class to hand uvicorn (`http=`), with these limits."""
    return type("ImgclfH11Protocol", (GuardedH11Protocol,),
                {"head_timeout": float(head_timeout), "max_connections": int(max_connections)})


class RouteLimit:
    """ASGI middleware: at most `limit` concurrent requests on `paths`; more get a JSON 503 at once.

    Also the last resort for the error shape: an exception that escapes the app before a
    response started becomes a JSON 500 (uvicorn's own is plain text), never a traceback.
    """

    def __init__(self, app: ASGIApp, limit: int, paths: tuple[str, ...] = ("/predict",)) -> None:
        self.app, self.limit, self.paths = app, max(1, limit), paths
        self.active = 0  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limited = scope["path"] in self.paths
        if limited and self.active >= self.limit:
            reply = error_response(503, "busy", f"the service is handling its limit of {self.limit} requests "
                                                "on this route; retry shortly",
                                   {"retry-after": "1", "connection": "close"})
            await reply(scope, receive, send)
            return
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.active += limited
        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error on %s %s", log_field(str(scope.get("method")), 24),
                          log_field(str(scope.get("path"))))
            if not started:
                await error_response(500, "internal_error", "the server failed on this request; see its log",
                                     {"connection": "close"})(scope, receive, send)
        finally:
            self.active -= limited
