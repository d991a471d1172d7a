"""Politeness that adapts (download/_politeness.py): the arithmetic, the cluster lease book, and
the whole downloader against a real rate-limiting host on 127.0.0.1 (tests/fault_server.py
`/limited/{k}/...`: 429 whenever more than k requests are in flight)."""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest
from fault_server import FaultServer
from PIL import Image

from imgclf.download._leases import LeaseBook, _water_fill
from imgclf.download._politeness import INITIAL, Aimd, Signals, host_key
from imgclf.stages import download

FAST = dict(timeout=3.0, read_timeout=2.0, connect_timeout=1.0, backoff=0.05, max_retry_after=1.0,
            processes=1, show_progress=False, print_summary=False)


def answered(n: int, latency: float = 0.02, saturated: bool = True) -> Signals:
    return Signals(answered=n, latency_sum=n * latency, latency_min=latency, saturated=n if saturated else 0)


def test_slow_start_doubles_each_round_trip_up_to_the_ceiling() -> None:
    aimd = Aimd(ceiling=100)
    assert aimd.capacity == INITIAL
    now = 0.0
    for expected in (16, 32, 64, 100):
        aimd.observe(answered(aimd.capacity), now)  # one round trip: every slot answered once
        now += 0.02
        assert aimd.capacity == expected


def test_unused_limit_does_not_grow() -> None:
    aimd = Aimd(ceiling=100)
    aimd.observe(answered(50, saturated=False), 0.0)
    assert aimd.capacity == INITIAL


def test_429_halves_once_per_round_trip_then_grows_additively() -> None:
    aimd = Aimd(ceiling=100, limit=64)
    aimd.observe(answered(64, saturated=False), 0.0)
    aimd.observe(Signals(overloaded=1), 1.0)
    assert aimd.capacity == 32 and not aimd.slow_start
    aimd.observe(Signals(overloaded=20), 1.001)  # the same window's other 429s: no second cut
    assert aimd.capacity == 32
    for i in range(32):  # one round trip of clean answers: +1
        aimd.observe(answered(1), 1.1 + i * 0.001)
    assert 32.9 < aimd.limit < 33.1
    aimd.observe(Signals(overloaded=1), 2.0)
    assert aimd.capacity == 16


def test_a_few_timeouts_on_a_healthy_host_are_not_push_back_but_many_are() -> None:
    aimd = Aimd(ceiling=100, limit=64)
    now = 0.0
    for _ in range(20):  # one dead URL every 50 answers
        aimd.observe(answered(49), now)
        aimd.observe(Signals(soft=1), now + 0.01)
        now += 0.05
    assert aimd.capacity == 100  # grew: 1 in 50 is a dead URL, not a drowning host
    aimd.observe(Signals(soft=8), now)  # the host stops answering
    assert aimd.capacity == 50


def test_rising_latency_stops_growth_but_never_shrinks_the_limit() -> None:
    aimd = Aimd(ceiling=100, limit=20)
    aimd.observe(answered(20, latency=0.1), 0.0)  # baseline 100 ms
    aimd.observe(answered(20, latency=0.3, saturated=False), 0.01)  # queueing: 3x baseline
    grown = aimd.capacity
    for i in range(30):
        aimd.observe(answered(1, latency=0.3), 0.02 + i * 0.001)
    assert aimd.capacity == grown == 40  # grew while latency held, holds now
    for i in range(40):
        aimd.observe(answered(1, latency=2.0), 0.1 + i * 0.01)  # 20x: the client's own lag looks the same
    assert aimd.capacity == grown


def test_water_fill_gives_nobody_more_than_asked_and_splits_the_rest() -> None:
    assert _water_fill(10, {"a": 2, "b": 100, "c": 100}) == {"a": 2, "b": 4, "c": 4}
    assert _water_fill(10, {"a": 100, "b": 100, "c": 100}) == {"a": 4, "b": 3, "c": 3}
    assert _water_fill(1, {"a": 5, "b": 9}) == {"a": 0, "b": 1}  # the hungriest gets the spare slot


def test_lease_book_holds_the_limit_as_a_total_across_workers() -> None:
    book = LeaseBook(ceiling=64)
    key = "img.example.com:443"
    grants = {w: book.sync(w, {key: (Signals(), 50)}, now=0.0)[key] for w in "abc"}
    assert sum(grants.values()) <= INITIAL and grants["a"] > 0
    now = 0.0
    for _ in range(12):  # every worker keeps every slot busy; the host answers cleanly
        now += 0.05
        for w in "abc":
            grants[w] = book.sync(w, {key: (answered(grants[w] or 1), 50)}, now=now)[key]
            assert sum(grants.values()) <= book.limit(key)
    assert book.limit(key) == 64 and min(grants.values()) >= 20  # grew to the ceiling, shared fairly
    # One worker reports 429s: the host's limit halves and the leases follow within one sync each.
    now += 1.0
    grants["a"] = book.sync("a", {key: (Signals(overloaded=3), 50)}, now=now)[key]
    for w in "bc":
        grants[w] = book.sync(w, {key: (Signals(), 50)}, now=now + 0.01)[key]
    grants["a"] = book.sync("a", {key: (Signals(), 50)}, now=now + 0.02)[key]
    assert book.limit(key) == 32 and sum(grants.values()) <= 32


def test_a_silent_worker_loses_its_lease() -> None:
    book = LeaseBook(ceiling=8, fixed=8)
    key = "h:80"
    assert book.sync("killed", {key: (Signals(), 100)}, now=0.0)[key] == 8
    assert book.sync("alive", {key: (Signals(), 100)}, now=1.0)[key] == 0  # all leased to "killed"
    assert book.sync("alive", {key: (Signals(), 100)}, now=10.0)[key] == 8  # "killed" never came back


def test_host_key_counts_host_and_port() -> None:
    assert host_key("http://127.0.0.1:8080/a.jpg") == "127.0.0.1:8080"
    assert host_key("https://cdn.example.com/a.jpg") == "cdn.example.com:443"
    assert host_key("https://cdn.example.com/a.jpg") != host_key("http://cdn.example.com/a.jpg")


# -- the real downloader against real hosts --------------------------------------------------------
def _distinct_pngs(server: FaultServer, n: int) -> list[str]:
    names = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (i % 256, i // 256, 99)).save(buf, "PNG")
        server.add(f"p{i}.png", buf.getvalue(), "image/png")
        names.append(f"p{i}.png")
    return names


def _run(urls: list[str], out, **options) -> pd.DataFrame:  # noqa: ANN001 - a tmp path
    out.mkdir(parents=True)
    pd.DataFrame({"url": urls, "label": "x"}).to_csv(out / "train.csv", index=False)
    result = download.run(download.DownloadOptions(sources=[out / "train.csv"], out=out / "d", **{**FAST, **options}))
    return pd.read_parquet(result.manifest_path)


def test_adaptive_limit_grows_past_the_old_fixed_16_on_a_fast_host(tmp_path) -> None:
    with FaultServer() as srv:
        names = _distinct_pngs(srv, 500)
        urls = [srv.url(f"limited/10000/{n}?ms=100") for n in names]
        manifest = _run(urls, tmp_path / "a", concurrency=64)
        peak = srv.limited["peak"]
    assert (manifest["status"] == "ok").all()
    assert peak > 32, f"peak in flight {peak}: the limit did not grow past the old fixed 16 per host"


def test_fewer_429s_than_a_fixed_limit_and_no_row_lost(tmp_path) -> None:
    rejected = {}
    with FaultServer() as srv:
        names = _distinct_pngs(srv, 300)
        for mode, per_host in (("fixed", 16), ("adaptive", None)):
            srv.limited.clear()
            urls = [srv.url(f"limited/4/{n}?ms=20&run={mode}") for n in names]
            manifest = _run(urls, tmp_path / mode, concurrency=64, per_host=per_host, retries=3)
            rejected[mode] = srv.limited["rejected"]
            if mode == "adaptive":
                assert manifest["status"].value_counts().to_dict() == {"ok": 300}, "a row was lost"
                assert srv.limited["served"] == 300  # and none fetched twice
    assert rejected["adaptive"] * 3 < rejected["fixed"], rejected


def test_per_host_fixes_the_limit(tmp_path) -> None:
    with FaultServer() as srv:
        names = _distinct_pngs(srv, 120)
        urls = [srv.url(f"limited/10000/{n}?ms=50") for n in names]
        _run(urls, tmp_path / "a", concurrency=64, per_host=3)
        assert srv.limited["peak"] == 3


@pytest.mark.parametrize("bad", [0, -1])
def test_per_host_must_be_positive(bad: int) -> None:
    from imgclf.errors import ConfigError

    with pytest.raises(ConfigError, match="--per-host"):
        download.DownloadOptions(per_host=bad)


def test_signals_add_up() -> None:
    total = Signals()
    total.add(answered(3, latency=0.1))
    total.add(Signals(answered=1, latency_sum=0.5, latency_min=0.5, overloaded=2))
    assert (total.answered, total.overloaded, total.latency_min) == (4, 2, 0.1)
    assert math.isclose(total.latency_sum, 0.8) and bool(total) and not Signals()


def test_a_url_that_never_answers_waits_a_few_times_the_hosts_latency_not_the_read_timeout(tmp_path) -> None:
    import time

    with FaultServer() as srv:
        names = _distinct_pngs(srv, 40)
        urls = [srv.url(f"limited/10000/{n}?ms=10") for n in names] + [srv.url("hang")]
        started = time.monotonic()
        manifest = _run(urls, tmp_path / "a", concurrency=4, read_timeout=15.0, timeout=30.0, retries=1)
        elapsed = time.monotonic() - started
    hang = manifest.iloc[-1]
    assert hang["status"] == "timeout" and "no response headers within 2.0s" in hang["error"], hang["error"]
    assert hang["attempts"] == 2 and elapsed < 10, elapsed  # 2 x 2 s, not 2 x 15 s


def test_a_429_with_retry_after_pauses_the_whole_host_not_just_its_url() -> None:
    # A 429 answers at once: without a pause, a limit on requests in flight does not bound the
    # rate a host sees (benchmarks/politeness_shards.py: 3x the host's rate limit before this).
    import asyncio
    import time

    from imgclf.download._politeness import PAUSE_MAX_S, HostLimiter

    async def scenario() -> tuple[float, float, float]:
        limiter = HostLimiter(ceiling=8)
        async with limiter.slot("http://h.example/a") as slot:
            slot.answered(0.01, 429, retry_after=0.3)
        started = time.monotonic()
        async with limiter.slot("http://h.example/other") as slot:  # another URL of the same host waits
            slot.answered(0.01, 200)
        waited = time.monotonic() - started
        started = time.monotonic()
        async with limiter.slot("http://other.example/a"):  # another host does not
            pass
        other = time.monotonic() - started
        async with limiter.slot("http://h.example/b") as slot:
            slot.answered(0.01, 503, retry_after=3600)  # a hostile Retry-After is capped
        started = time.monotonic()
        host_pause = limiter._hosts["h.example:80"].paused_until - started
        return waited, other, host_pause

    waited, other, host_pause = asyncio.run(scenario())
    assert 0.28 <= waited < 1.0 and other < 0.05
    assert host_pause <= PAUSE_MAX_S


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/a.png", "https://EXAMPLE.com/x?y=1", "http://user:pw@Host.example:81#frag",
    "http://[::1]:9000/img", "http://[::1]/img", "https://例え.jp/写真.jpg", "http://example.com?x",
    "http://example.com#f", "HTTP://Example.COM/", "http://exa mple.com/", "http://", "not a url",
    "http://a:notaport/x", "http://a:99999/x", "http://example.com:/x", "http://a.com\\b/c", "//host/x"])
def test_host_key_is_yarls_host_and_port_of_the_whole_url(url: str) -> None:
    """host_key parses only the scheme and authority (cached): the same key as parsing the whole URL."""
    from yarl import URL

    try:
        parsed = URL(url)
        expected = f"{parsed.host}:{parsed.port}"
    except (ValueError, TypeError):
        expected = ""
    assert host_key(url) == expected
