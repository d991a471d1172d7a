"""A static file server on 127.0.0.1 in a background thread (demo and benchmarks).

It exists so the demo exercises the real downloader over real HTTP without internet.
Only files under `root` are served; the port is chosen by the OS.
"""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _QuietHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real image hosts do

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


class LocalServer:
    """`with LocalServer(root) as server: server.url("a/b.png")`."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1") -> None:
        handler = functools.partial(_QuietHandler, directory=str(root))
        self._httpd = ThreadingHTTPServer((host, 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, relative: str) -> str:
        return f"{self.base_url}/{relative.lstrip('/')}"

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
