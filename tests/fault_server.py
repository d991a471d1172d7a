"""A real, hostile HTTP server on 127.0.0.1 for the download tests (aiohttp.web in a thread).

Every request is counted per path (`server.counts`), so tests can prove what was fetched twice.
Routes:
    /file/{name}                 a registered body (`server.add(name, body, content_type)`)
    /status/{code}               an empty answer with that status
    /flaky/{key}/{code}/{n}/{name}  `code` for the first n requests of key, then /file/{name};
                                 429 answers carry `Retry-After: ?after=` seconds
    /trickle                     headers, then one byte every 0.2 s for ever
    /hang                        reads the request and never answers
    /reset                       headers and half the body, then a TCP reset
    /redirect/{n}/{name}         n redirects (relative and absolute), then /file/{name}
    /loop/{a|b}                  a -> b -> a ...
    /gzip/{name}                 the body gzip-compressed, with Content-Encoding: gzip
    /stream/{n}                  n bytes in chunks, without Content-Length
    /limited/{k}/{name}          a rate-limited host: 429 when more than k of these requests are
                                 in flight, else /file/{name} after ?ms= milliseconds
                                 (`server.limited` counts served, rejected and the peak in flight)
A per-request `latency` (seconds) slows every route down (for the kill-and-resume test).
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import struct
import threading
from collections import Counter

from aiohttp import web


class FaultServer:
    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.counts: Counter[str] = Counter()
        self.files: dict[str, tuple[bytes, str]] = {}
        self._flaky: Counter[str] = Counter()
        self.limited: Counter[str] = Counter()  # served, rejected, peak, in_flight
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- public helpers ---------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def add(self, name: str, body: bytes, content_type: str = "application/octet-stream") -> str:
        self.files[name] = (body, content_type)
        return self.url(f"file/{name}")

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> FaultServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._count])
        app.add_routes([
            web.get("/file/{name}", self._file), web.get("/status/{code}", self._status),
            web.get("/flaky/{key}/{code}/{n}/{name}", self._flaky_route), web.get("/trickle", self._trickle),
            web.get("/hang", self._hang), web.get("/reset", self._reset),
            web.get("/redirect/{n}/{name}", self._redirect), web.get("/loop/{side}", self._loop_route),
            web.get("/gzip/{name}", self._gzip), web.get("/stream/{n}", self._stream),
            web.get("/limited/{k}/{name}", self._limited),
        ])
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @web.middleware
    async def _count(self, request: web.Request, handler):  # noqa: ANN001, ANN202 - aiohttp signature
        self.counts[request.path] += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        return await handler(request)

    # -- routes -----------------------------------------------------------------------------
    def _body(self, name: str) -> tuple[bytes, str]:
        if name not in self.files:
            raise web.HTTPNotFound()
        return self.files[name]

    async def _file(self, request: web.Request) -> web.Response:
        body, ctype = self._body(request.match_info["name"])
        return web.Response(body=body, content_type=ctype)

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="error page")

    async def _flaky_route(self, request: web.Request) -> web.Response:
        info = request.match_info
        self._flaky[info["key"]] += 1
        if self._flaky[info["key"]] <= int(info["n"]):
            code = int(info["code"])
            headers = {"Retry-After": request.query["after"]} if "after" in request.query else {}
            return web.Response(status=code, text="try later", headers=headers)
        body, ctype = self._body(info["name"])
        return web.Response(body=body, content_type=ctype)

    async def _limited(self, request: web.Request) -> web.Response:
        stats = self.limited
        if stats["in_flight"] >= int(request.match_info["k"]):
            stats["rejected"] += 1
            return web.Response(status=429, text="slow down")
        stats["in_flight"] += 1
        stats["peak"] = max(stats["peak"], stats["in_flight"])
        try:
            await asyncio.sleep(float(request.query.get("ms", "0")) / 1000)
            body, ctype = self._body(request.match_info["name"])
            stats["served"] += 1
            return web.Response(body=body, content_type=ctype)
        finally:
            stats["in_flight"] -= 1

    async def _trickle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": "100000"})
        await resp.prepare(request)
        for _ in range(100_000):
            await resp.write(b"\xff")
            await asyncio.sleep(0.2)
        return resp

    async def _hang(self, request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response(text="too late")

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/png", "Content-Length": "20000"})
        await resp.prepare(request)
        await resp.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 9992)
        await asyncio.sleep(0.05)
        sock = request.transport.get_extra_info("socket")
        # SO_LINGER 0 turns close() into a RST: the client sees "connection reset" mid-body.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        request.transport.abort()
        return resp

    async def _redirect(self, request: web.Request) -> web.Response:
        n, name = int(request.match_info["n"]), request.match_info["name"]
        if n <= 0:
            raise web.HTTPFound(f"/file/{name}")
        # Alternate relative and absolute Location headers: both appear in the wild.
        target = f"/redirect/{n - 1}/{name}" if n % 2 else self.url(f"redirect/{n - 1}/{name}")
        raise web.HTTPMovedPermanently(target)

    async def _loop_route(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop/b" if request.match_info["side"] == "a" else "/loop/a")

    async def _gzip(self, request: web.Request) -> web.Response:
        body, ctype = self._body(request.match_info["name"])
        return web.Response(body=gzip.compress(body), headers={"Content-Encoding": "gzip",
                                                               "Content-Type": ctype})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        left = int(request.match_info["n"])
        while left > 0:
            await resp.write(b"\0" * min(65536, left))
            left -= 65536
        await resp.write_eof()
        return resp


def closed_port() -> int:
    """A port with nothing listening (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- real encoded images for the fault cases ---------------------------------------------------
def _encode(img, fmt: str, **kw) -> bytes:  # noqa: ANN001 - a PIL image
    import io

    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (decoding it would need ~10 GB)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def sample_images() -> dict[str, bytes]:
    """Every kind of body the fault tests serve, built with Pillow (real encoders)."""
    from PIL import Image

    rgb = Image.new("RGB", (64, 48), (200, 30, 30))
    rgb.paste((30, 30, 200), (32, 0, 64, 48))  # left red, right blue: orientation is visible
    jpeg = _encode(rgb, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (0, 0, 16, 32))
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    deep = Image.new("I;16", (40, 30))
    deep.putdata([i * 50 for i in range(40 * 30)])
    return {
        "rgb.jpg": jpeg,
        "other.png": _encode(Image.new("RGB", (40, 40), (10, 120, 10)), "PNG"),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "cmyk.jpg": _encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
        "deep16.png": _encode(deep, "PNG"),
        "palette_alpha.png": _encode(palette, "PNG", transparency=0),
        "animated.gif": gif,
        "image.webp": _encode(rgb, "WEBP", quality=80),
        "rotated.jpg": _encode(rgb, "JPEG", quality=95, exif=exif.tobytes()),
        "tiny.png": _encode(Image.new("RGB", (1, 1), (0, 0, 0)), "PNG"),
        "bomb.png": bomb_png(),
        "big.jpg": _encode(Image.effect_noise((400, 400), 64).convert("RGB"), "JPEG", quality=100),
        "page.html": b"<!DOCTYPE html><html><body><h1>Not found</h1></body></html>",
        "drawing.svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
                       b'<rect width="10" height="10"/></svg>',
        "notes.txt": b"just some text, not an image at all\n" * 4,
        "empty.jpg": b"",
        # Distinct content for cases that must end "ok" (equal content would be a duplicate).
        **{f"solid{i}.{ext}": _encode(Image.new("RGB", (20, 16), (i * 40, 255 - i * 40, 90)), fmt)
           for i, (ext, fmt) in enumerate([("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"),
                                           ("jpg2", "JPEG"), ("png2", "PNG")])},
    }
