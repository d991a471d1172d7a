"""serve: a real `imgclf serve` process on 127.0.0.1, its page in headless Chromium, and a load test."""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import DEMO_ROOT, ThreadedServer, demo_images, free_port, wait_healthy

from imgclf._localserver import LocalServer
from imgclf.inference import load_classifier
from imgclf.net.guard import FetchOptions, GuardedFetcher, literal_address
from imgclf.serve import ServeOptions, create_app

BROKEN = DEMO_ROOT.parent / "broken"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--headless=new", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]



SERVER_LOG: dict[str, Path] = {}


@pytest.fixture(scope="module")
def server(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`imgclf serve` as a user starts it: its own process, default SSRF policy, 1 MB upload cap.

    Its log goes to a file (a pipe nobody reads would fill with access-log lines and block the server).
    """
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "imgclf", "serve", "--model", str(tiny_run), "--port", str(port),
               "--max-upload-mb", "1"]
    log_path = SERVER_LOG["server"] = tmp_path_factory.mktemp("serve") / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log_path=log_path)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)



@pytest.fixture(scope="module")
def image_server() -> Iterator[LocalServer]:
    with LocalServer(DEMO_ROOT.parent) as srv:
        yield srv


def _post_file(base: str, path: Path, **params) -> httpx.Response:
    with open(path, "rb") as fh:
        return httpx.post(f"{base}/predict", files={"file": (path.name, fh, "image/png")}, params=params,
                          timeout=30)


def test_health_labels_and_openapi(server: str, tiny_run: Path) -> None:
    classes = load_classifier(tiny_run).class_names
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["classes"] == len(classes) and health["backend"] == "torch"
    assert httpx.get(f"{server}/labels").json() == {"labels": classes}
    spec = httpx.get(f"{server}/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert httpx.get(f"{server}/docs").status_code == 200


def test_upload_matches_predict_stage(server: str, tiny_run: Path) -> None:
    image = demo_images("test", "Coat", 1)[0]
    classifier = load_classifier(tiny_run)
    from imgclf.images import open_image_file

    want = classifier.top_k(classifier.probabilities([classifier.prepare(open_image_file(str(image)))])[0], 5)
    got = _post_file(server, image).json()
    assert got["source"] == "upload"
    assert [p["label"] for p in got["predictions"]] == [label for label, _ in want]
    assert all(abs(p["probability"] - w) < 1e-5 for p, (_, w) in zip(got["predictions"], want, strict=True))
    raw = httpx.post(f"{server}/predict?top_k=1", content=image.read_bytes(),
                     headers={"content-type": "image/png"})
    assert raw.json()["predictions"] == got["predictions"][:1]


@pytest.mark.parametrize("case", ["html", "truncated", "empty", "too_large", "wrong_type", "bad_json",
                                  "no_file", "bad_top_k", "url_loopback", "url_localhost", "url_scheme",
                                  "url_link_local", "url_loopback_short_form"])
def test_client_mistakes_get_4xx_json_and_the_service_keeps_running(server: str, case: str) -> None:
    url = f"{server}/predict"
    json_post = lambda payload: httpx.post(url, json=payload, timeout=30)  # noqa: E731
    by_name = server.replace("127.0.0.1", "localhost")  # a name: refused by the resolver guard
    expected = {
        "html": (400, "not_image", lambda: _post_file(server, BROKEN / "removed.html")),
        "truncated": (400, "not_image", lambda: _post_file(server, BROKEN / "truncated.png")),
        "empty": (400, "empty", lambda: httpx.post(url, files={"file": ("e.png", b"", "image/png")})),
        "too_large": (413, "too_large",
                      lambda: httpx.post(url, files={"file": ("big.png", os.urandom(1_200_000))})),
        "wrong_type": (415, "unsupported_media_type",
                       lambda: httpx.post(url, content=b"hello", headers={"content-type": "text/plain"})),
        "bad_json": (422, "invalid_json", lambda: json_post({"link": "http://example.com/a.png"})),
        "no_file": (422, "no_file", lambda: httpx.post(url, files={"other": ("a.png", b"x")})),
        "bad_top_k": (422, "invalid_request", lambda: _post_file(server, BROKEN / "truncated.png", top_k=0)),
        "url_loopback": (403, "url_refused", lambda: json_post({"url": f"{server}/health"})),
        "url_localhost": (403, "url_refused", lambda: json_post({"url": by_name})),
        "url_scheme": (422, "url_invalid_url", lambda: json_post({"url": "file:///etc/passwd"})),
        "url_link_local": (403, "url_refused", lambda: json_post({"url": "http://169.254.169.254/latest/meta-data"})),
        "url_loopback_short_form": (403, "url_refused",
                                    lambda: json_post({"url": server.replace("127.0.0.1", "127.1") + "/health"})),
    }
    status, code, send = expected[case]
    response = send()
    assert response.status_code == status, response.text
    assert response.json()["error"] == code and response.json()["detail"]
    assert httpx.get(f"{server}/health").status_code == 200


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0177.0.0.1", "127.000.000.001", "127.0.0.1.",
                                  "0x7f.1", "0x7f000001", "10.1", "[::1]", "[::ffff:127.0.0.1]"])
def test_numeric_host_forms_are_refused_before_any_connection(host: str) -> None:
    # aiohttp < 3.14 connects to numeric-looking hosts without asking the resolver, so the
    # pre-flight check must canonicalise every form the OS accepts (no network needed here).
    failed = GuardedFetcher(FetchOptions())._check_url(f"http://{host}:8000/health")
    assert failed is not None and failed.code == "refused", failed


@pytest.mark.parametrize("host", ["1.2.3.4.5", "99999999999", "0x"])
def test_numeric_host_that_is_no_address_is_invalid(host: str) -> None:
    failed = GuardedFetcher(FetchOptions())._check_url(f"http://{host}/a.png")
    assert failed is not None and failed.code == "invalid_url", failed


def test_public_numeric_hosts_and_names_pass_the_preflight_check() -> None:
    fetcher = GuardedFetcher(FetchOptions())
    assert literal_address("8.8.8.8.") == "8.8.8.8" and literal_address("0x08080808") == "8.8.8.8"
    assert fetcher._check_url("http://8.8.8.8/a.png") is None
    assert fetcher._check_url("http://example.com/a.png") is None  # names: the resolver guard decides
    assert literal_address("1e3.example") is None


def test_chunked_upload_over_the_limit_is_cut(server: str) -> None:
    def body() -> Iterator[bytes]:  # no Content-Length: the server must count as it reads
        for _ in range(40):
            yield b"\0" * 65536

    response = httpx.post(f"{server}/predict", content=body(), headers={"content-type": "image/png"})
    assert response.status_code == 413 and response.json()["error"] == "too_large"
    assert httpx.get(f"{server}/health").status_code == 200


def test_url_fetch_with_allow_private(tiny_run: Path, image_server: LocalServer) -> None:
    options = ServeOptions(fetch=FetchOptions(allow_private=True, total_timeout=5))
    image = demo_images("test", "Bag", 1)[0]
    with ThreadedServer(create_app(load_classifier(tiny_run), options)) as base:
        image_url = image_server.url(f"fashion_mnist/test/Bag/{image.name}")
        by_url = httpx.post(f"{base}/predict", json={"url": image_url})
        assert by_url.status_code == 200, by_url.text
        assert by_url.json()["source"].endswith(image.name)
        assert by_url.json()["predictions"] == _post_file(base, image).json()["predictions"]
        missing = httpx.post(f"{base}/predict", json={"url": image_server.url("nope.png")})
        assert missing.status_code == 422 and missing.json()["error"] == "url_http_error"
        html = httpx.post(f"{base}/predict", json={"url": image_server.url("broken/removed.html")})
        assert html.status_code == 400 and html.json()["error"] == "not_image"


def _same(a: dict, b: dict) -> bool:
    """Same labels in the same order; probabilities equal up to float noise (batches differ in size)."""
    pa, pb = a["predictions"], b["predictions"]
    return [p["label"] for p in pa] == [p["label"] for p in pb] and all(
        abs(x["probability"] - y["probability"]) < 1e-4 for x, y in zip(pa, pb, strict=True))


def test_load_2000_requests_16_concurrent(server: str) -> None:
    images = [p for label in ("Bag", "Coat", "Ankle_boot") for p in demo_images("test", label, 3)]
    bodies = [p.read_bytes() for p in images]
    reference = [httpx.post(f"{server}/predict", content=b, headers={"content-type": "image/png"}).json()
                 for b in bodies]

    async def hammer(total: int, concurrency: int) -> tuple[list[float], list[str]]:
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        problems: list[str] = []
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=server, limits=limits, timeout=60) as client:
            async def one(i: int) -> None:
                async with gate:
                    start = time.perf_counter()
                    resp = await client.post("/predict", content=bodies[i % len(bodies)],
                                             headers={"content-type": "image/png"})
                    latencies.append(time.perf_counter() - start)
                    if resp.status_code != 200 or not _same(resp.json(), reference[i % len(bodies)]):
                        problems.append(f"{i}: {resp.status_code} {resp.text[:100]}")

            await asyncio.gather(*(one(i) for i in range(total)))
        return latencies, problems

    started = time.perf_counter()
    latencies, problems = asyncio.run(hammer(2000, 16))
    wall = time.perf_counter() - started
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * len(latencies)) - 1]
    print(f"\nload: 2000 requests, 16 concurrent, {wall:.1f}s, {2000 / wall:.0f} req/s, "
          f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, errors {len(problems)}")
    assert problems == []
    assert len(latencies) == 2000
    assert httpx.get(f"{server}/health").status_code == 200


@pytest.mark.browser
def test_page_in_headless_chromium(server: str, tiny_run: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    image = demo_images("test", "Ankle_boot", 1)[0]
    api = _post_file(server, image).json()["predictions"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{server}/")
            expect(page.locator("#model")).to_contain_text(f"{len(api)} classes")
            # 1) choose a file
            page.set_input_files("#file", str(image))
            rows = page.locator("li.prediction")
            expect(rows).to_have_count(len(api))
            assert rows.locator(".label").all_text_contents() == [p["label"] for p in api]
            top_width = rows.first.locator(".bar > span").evaluate("el => el.style.width")
            # The bar is as wide as the probability (the browser normalises "100.0%" to "100%").
            assert abs(float(top_width.rstrip("%")) - 100 * api[0]["probability"]) < 0.06
            expect(page.locator("#preview")).to_be_visible()
            # 2) drop a file on the drop zone
            page.evaluate("""async (b64) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
                document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt }));
            }""", base64.b64encode(BROKEN.joinpath("truncated.png").read_bytes()).decode())
            expect(page.locator("#error")).to_contain_text("Could not classify")
            expect(rows).to_have_count(0)
            # 3) a URL the server refuses: the page shows why
            page.fill("#url", f"{server}/health")
            page.click("button[type=submit]")
            expect(page.locator("#error")).to_contain_text("loopback")
        finally:
            browser.close()


@pytest.mark.browser
def test_swagger_ui_works_offline(server: str) -> None:
    # FastAPI's default /docs pulls Swagger UI from a CDN; ours must render with no network at all.
    from playwright.sync_api import expect, sync_playwright

    html = httpx.get(f"{server}/docs").text
    assert "/static-offline-docs/swagger-ui-bundle.js" in html and "cdn." not in html
    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server)
                       else (outside.append(route.request.url), route.abort()))
            page.goto(f"{server}/docs")
            expect(page.locator(".swagger-ui .info .title")).to_contain_text("imgclf")
            expect(page.locator(".opblock-summary-path", has_text="/predict").first).to_be_visible()
        finally:
            browser.close()
    assert outside == []


def test_access_log_and_prometheus_metrics(server: str) -> None:
    image = demo_images("test", "Bag", 1)[0]
    assert _post_file(server, image).status_code == 200
    assert httpx.post(f"{server}/predict", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert httpx.get(f"{server}/nowhere").status_code == 404
    reply = httpx.get(f"{server}/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in reply.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['imgclf_requests_total{method="POST",path="/predict",status="200"}'] >= 1
    assert samples['imgclf_errors_total{error="unsupported_media_type",status="415"}'] >= 1
    assert samples['imgclf_errors_total{error="not_found",status="404"}'] >= 1
    assert samples['imgclf_requests_total{method="GET",path="other",status="404"}'] >= 1  # never the raw URL
    assert samples["imgclf_batch_size_count"] >= 1 and samples["imgclf_batch_size_sum"] >= 1
    assert samples['imgclf_request_seconds_count{path="/predict"}'] >= 2
    log = SERVER_LOG["server"].read_text()
    access = [line for line in log.splitlines() if "imgclf.serve.access" in line]
    assert any('"POST /predict" 200 ' in line and line.endswith("B") for line in access), log[-2000:]
    assert any('"GET /nowhere" 404 ' in line for line in access)
