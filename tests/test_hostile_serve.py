"""Hostile clients and bodies against a real `imgclf serve` process on 127.0.0.1 (issue 10, classes 1, 2, 7).

The server runs with small limits (2 concurrent predictions, 2 s for a request head, 3 s for a
body) so the deadlines are exercised in seconds. Time bounds are generous (the machine is shared);
the figures that matter are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import demo_images, free_port
from hostile import (
    extreme_aspect_png,
    huge_header_jpeg,
    many_frames_gif,
    many_scans_jpeg,
    png_text_bomb,
)

HEAD_TIMEOUT, BODY_TIMEOUT, CONCURRENCY = 2.0, 3.0, 2



@pytest.fixture(scope="module")
def served(tiny_run: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    command = [sys.executable, "-m", "imgclf", "serve", "--model", str(tiny_run), "--port", str(port),
               "--max-upload-mb", "1", "--max-concurrency", str(CONCURRENCY),
               "--head-timeout", str(HEAD_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # torch and the model load slowly on a busy 2-core machine
    while True:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read() if proc.stderr else "server exited")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"{base} never became healthy") from None
            time.sleep(0.3)
    try:
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _connect(base: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", _port(base)), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    return sock


def _reply(sock: socket.socket, seconds: float) -> tuple[int, dict]:
    """(status, JSON body) of the reply on a raw socket; (0, {}) when it closed without one."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    if not data:
        return 0, {}
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


_CLIENT = httpx.Client(timeout=5)  # one client: time the server, not the client's set-up


def _closed(sock: socket.socket, seconds: float = 0.5) -> bool:
    """Whether the server hung up on this socket (EOF or reset); False while it stays open and silent."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _health_seconds(base: str) -> float:
    started = time.monotonic()
    response = _CLIENT.get(f"{base}/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    return time.monotonic() - started


def _median_health_seconds(base: str, calls: int = 5) -> float:
    return sorted(_health_seconds(base) for _ in range(calls))[calls // 2]


def _health_bound(base: str) -> float:
    """1 s, or 3x the quiet service's median on a machine too busy to answer anything in 1 s."""
    return max(1.0, 3 * _median_health_seconds(base))


def _vm_hwm_mib(proc: subprocess.Popen) -> float:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _post_image(base: str, data: bytes, ctype: str = "image/png") -> httpx.Response:
    return httpx.post(f"{base}/predict", content=data, headers={"content-type": ctype}, timeout=30)


# ---------------------------------------------------------------- class 2: slow and idle clients


def test_idle_sockets_never_block_health_and_are_closed_after_the_head_deadline(served) -> None:
    base, _ = served
    bound = _health_bound(base)
    idle = [_connect(base) for _ in range(150)]  # far more than --max-concurrency, none sends a byte
    try:
        assert _median_health_seconds(base) < bound
        good = demo_images("test", "Bag", 1)[0].read_bytes()
        assert _post_image(base, good).status_code == 200  # real work still gets through
        time.sleep(HEAD_TIMEOUT + 1.5)
        assert all(_closed(sock) for sock in idle[:20])  # the server hung up: no head within the deadline
    finally:
        for sock in idle:
            sock.close()


def test_slow_bodies_fill_the_predict_limit_get_408_and_health_stays_up(served) -> None:
    base, _ = served
    bound = _health_bound(base)
    slow = []
    for _ in range(CONCURRENCY):
        sock = _connect(base)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n")
        slow.append(sock)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        while time.monotonic() - started < BODY_TIMEOUT - 1:  # a byte a second: never idle, never done
            for sock in slow:
                sock.send(b"x")
            assert _median_health_seconds(base, 3) < bound
            time.sleep(0.5)
        busy = _post_image(base, b"\x89PNG")
        if busy.status_code == 503:  # still held by the trickles: refused at once, as JSON
            assert busy.json()["error"] == "busy" and busy.headers["retry-after"] == "1"
        for sock in slow:
            status, body = _reply(sock, BODY_TIMEOUT + 5)
            assert status == 408 and body["error"] == "body_timeout"
        assert time.monotonic() - started < BODY_TIMEOUT + 8
    finally:
        for sock in slow:
            sock.close()


def test_a_request_head_sent_one_byte_at_a_time_is_cut_with_408(served) -> None:
    base, _ = served
    sock = _connect(base)
    try:
        started = time.monotonic()
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        for i in range(int(HEAD_TIMEOUT * 4)):
            try:
                sock.send(head[i:i + 1])
            except OSError:
                break
            time.sleep(0.5)
        status, body = _reply(sock, 5)
        assert status == 408 and body["error"] == "head_timeout"
        assert time.monotonic() - started < HEAD_TIMEOUT * 4 + 5
    finally:
        sock.close()


def test_every_error_reply_is_json(served) -> None:
    base, _ = served
    assert httpx.get(f"{base}/nope").json()["error"] == "not_found"
    wrong = httpx.get(f"{base}/predict")
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed" and "allow" in wrong.headers
    big = _post_image(base, b"\x00" * (2 << 20))
    assert big.status_code == 413 and big.json()["error"] == "too_large"
    # A malformed request line; a request head that keeps growing (past the 16 KiB head limit).
    for raw in (b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000):
        sock = _connect(base)
        sock.sendall(raw)
        status, body = _reply(sock, 5)
        sock.close()
        assert status == 400 and body["error"] == "bad_request"
    # A URL with a lone surrogate: refused as JSON (never a plain-text 500 from an encoding error).
    weird = httpx.post(f"{base}/predict", content=b'{"url": "http://\\udcff.invalid/a.png"}',
                       headers={"content-type": "application/json"}, timeout=30)
    assert weird.status_code == 422 and weird.json()["error"] in ("invalid_json", "url_invalid_url")


# ---------------------------------------------------------------- class 1: work per image


@pytest.mark.parametrize("name, body, status", [
    ("1x200,000 strip", extreme_aspect_png(1, 200_000), 413),
    ("1x60,000 strip (huge eval resize)", extreme_aspect_png(1, 60_000), 413),
    ("header claims 65,000 x 65,000", huge_header_jpeg(), 413),
    ("2,000-scan progressive JPEG", many_scans_jpeg(), 413),
    ("200 zTXt chunks of 1 MB", png_text_bomb(), 400),
    ("40,000-frame GIF (under the 1 MB upload cap)", many_frames_gif(40_000), 200),
])
def test_costly_images_are_refused_in_bounded_time_and_memory(served, name: str, body: bytes, status: int) -> None:
    base, proc = served
    before = _vm_hwm_mib(proc)
    started = time.monotonic()
    response = _post_image(base, body, "application/octet-stream")
    assert time.monotonic() - started < 10, name
    assert response.status_code == status, (name, response.text)
    if status != 200:
        assert set(response.json()) == {"error", "detail"} and response.json()["error"] in ("too_large", "not_image")
    assert _vm_hwm_mib(proc) - before < 300, name  # the 1 x 200,000 strip alone took ~3 GB before


def test_the_start_line_names_an_address_to_open(served) -> None:
    from imgclf.serve import where_to_open

    assert where_to_open("127.0.0.1", 8000) == "on http://127.0.0.1:8000/"
    assert "open http://127.0.0.1:8000/" in where_to_open("0.0.0.0", 8000)
    assert where_to_open("::1", 9) == "on http://[::1]:9/"


def test_past_max_connections_the_longest_idle_connection_is_closed(tiny_run: Path) -> None:
    """The cap on open connections (guarded_protocol's max_connections; 1,024 from the CLI) evicts idle ones,
    so a crowd of idle sockets can neither exhaust descriptors nor keep a health check out."""
    import threading

    import uvicorn

    from imgclf.inference import load_classifier
    from imgclf.serve import ServeOptions, create_app
    from imgclf.serve._connections import guarded_protocol

    app = create_app(load_classifier(tiny_run), ServeOptions())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error",
                                           http=guarded_protocol(head_timeout=60, max_connections=20)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    idle = []
    try:
        for _ in range(40):
            idle.append(_connect(base))
            time.sleep(0.01)  # in order: the first ones have waited longest
        assert _health_seconds(base) < 5
        closed = [_closed(sock, 0.2) for sock in idle]
        assert all(closed[:15]) and not all(closed[-5:])  # the oldest went first; the newest are still open
    finally:
        for sock in idle:
            sock.close()
        server.should_exit = True
        thread.join(timeout=10)


# ---------------------------------------------------------------- issue 22: metrics labels and the access log


@pytest.fixture(scope="module")
def served_logged(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`imgclf serve` with default options, its log in a file (many access lines: a pipe would fill)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "imgclf", "serve", "--model", str(tiny_run), "--port",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"{base} never became healthy"
                time.sleep(0.3)
        yield base, log_path
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_made_up_methods_and_paths_add_no_metric_series(served_logged) -> None:
    base, _ = served_logged
    with httpx.Client(timeout=10) as client:
        before = client.get(f"{base}/metrics").text
        for i in range(300):  # before: each made-up method was a series of its own (20,000 -> 3.3 MB)
            client.request(f"M{i:04d}X", f"{base}/predict")
            client.get(f"{base}/docs/{i}")
            client.get(f"{base}/static-offline-docs/x{i}.js")
            client.get(f"{base}/redocX{i}")
        after = client.get(f"{base}/metrics").text
    series = [line for line in after.splitlines() if line.startswith("imgclf_requests_total{")]
    assert not any(made_up in after for made_up in ("M0", "/docs/1", "redocX", "x1.js"))
    assert any('method="other",path="/predict"' in line for line in series), series
    assert len(series) <= 12, series
    assert len(after) < len(before) + 8_000  # a handful of new series, not 1,200
    errors = [line for line in after.splitlines() if line.startswith("imgclf_errors_total{")]
    assert all('error="' in line for line in errors) and len(errors) <= 6, errors


def _raw(base: str, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", _port(base)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
    return int(data.split()[1]) if data else 0


def test_the_access_log_escapes_what_a_request_chose_and_ignores_x_forwarded_for(served_logged) -> None:
    base, log_path = served_logged
    forged = b"INFO imgclf.serve.access: 10.0.0.1:1 \"GET /admin\" 200 0.1ms 0B"
    requests = [
        b"GET /x%0d%0a" + forged.replace(b" ", b"%20").replace(b'"', b"%22") + b"%1b[2J HTTP/1.1\r\n",
        b"GET /q?a=%0d%0aINFO%20forged%1b]0;title%07 HTTP/1.1\r\n",
        b"GET /caf\xc3\xa9\xc2\x85\xe2\x80\xa8\xe2\x80\xae HTTP/1.1\r\n",  # NEL, LINE SEPARATOR, RLO (h11: 400)
        b"GET /health HTTP/1.1\r\nX-Forwarded-For: 203.0.113.7\r\n",
        b"GET /health HTTP/1.1\r\nX-Forwarded-For: 203.0.113.8\r\n  INFO continuation forged\r\n",
    ]
    for request in requests:
        assert _raw(base, request + b"Host: x\r\nConnection: close\r\n\r\n") in (200, 400, 404)
    time.sleep(0.5)
    text = log_path.read_bytes().decode("utf-8", "surrogateescape")
    lines = text.splitlines()
    assert "\x1b" not in text and "\x07" not in text and "\u2028" not in text and "\u202e" not in text
    assert all("imgclf.serve.access" in line for line in lines if "forged" in line or "/caf" in line), lines[-8:]
    assert any('"GET /x%0d%0aINFO%20imgclf.serve.access:%2010.0.0.1:1%20%22GET' in line for line in lines)
    assert not [line for line in lines if "forged" in line and not line.startswith("INFO imgclf.serve.access: ")]
    health = [line for line in lines if '"GET /health"' in line]
    # Any client can send X-Forwarded-For: without --trusted-proxy the socket's peer is logged.
    assert health and not any("203.0.113" in line or "continuation" in line for line in health), health[-3:]
    assert all("127.0.0.1:" in line for line in health[-2:])


@pytest.mark.parametrize("peer,header,expected", [
    ("127.0.0.1", b"203.0.113.7", "203.0.113.7"),  # a trusted proxy names the client
    ("127.0.0.1", b"198.51.100.1, 203.0.113.7", "203.0.113.7"),  # rightmost: the one our proxy saw
    ("127.0.0.1", b"203.0.113.7, 127.0.0.1", "203.0.113.7"),  # a chain of trusted proxies is skipped
    ("127.0.0.1", b"203.0.113.7 INFO continuation forged", None),  # free text is never an address
    ("127.0.0.1", b"203.0.113.7\r\nINFO forged", None),
    ("127.0.0.1", b"", None),
    ("192.0.2.5", b"203.0.113.7", None),  # not a trusted proxy: the header is anyone's
    ("127.0.0.1", b"2001:db8::7", "2001:db8::7"),
])
def test_x_forwarded_for_only_from_a_trusted_proxy_and_only_an_address(peer: str, header: bytes,
                                                                        expected: str | None) -> None:
    from imgclf.serve._observability import forwarded_client, trusted_networks

    scope = {"client": (peer, 5000), "headers": [(b"x-forwarded-for", header)] if header else []}
    assert forwarded_client(scope, trusted_networks(["127.0.0.1", "10.0.0.0/8"])) == expected
    assert forwarded_client(scope, ()) is None


@pytest.mark.parametrize("raw,logged", [
    ("/a\r\nINFO forged", "/a\\x0d\\x0aINFO forged"),
    ("/\x1b[2J\x07", "/\\x1b[2J\\x07"),
    ("/\x85\u2028\u202e", "/\\x85\\u2028\\u202e"),  # NEL, LINE SEPARATOR, RIGHT-TO-LEFT OVERRIDE
    ('/"quoted" \\x41', "/\\x22quoted\\x22 \\x5cx41"),  # the delimiters too: escaping stays unambiguous
    ("/café", "/café"),
])
def test_log_field_keeps_one_request_on_one_line(raw: str, logged: str) -> None:
    """What AccessLog does with a decoded path (ASGI servers without raw_path) or any other field."""
    from imgclf.untrusted import log_field

    assert log_field(raw) == logged and len(log_field("/" * 500)) == 203


def test_trusted_proxy_takes_only_an_address_or_network(capsys: pytest.CaptureFixture[str]) -> None:
    from imgclf.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", "--model", "x", "--trusted-proxy", "proxy.example, 1.2.3.4"])
    assert info.value.code == 2
    assert "--trusted-proxy: not an IP address or network: 'proxy.example, 1.2.3.4'" in capsys.readouterr().err
