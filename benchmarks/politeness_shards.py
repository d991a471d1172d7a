"""Politeness across `--shard i/n` jobs: n jobs at once against hosts that answer 429 above a rate.

    .venv/bin/python benchmarks/politeness_shards.py                       # 4 jobs, 6 hosts x 400 URLs
    .venv/bin/python benchmarks/politeness_shards.py --jobs 4 --hosts 6 --urls 400 --rate 100

One process on 127.0.0.1 serves `--hosts` hosts (one port each: the politeness key is host and
port) with `--latency` per request. Each host allows `--rate` requests per second (a sliding
one-second window of the requests it served): above it, the request gets 429 with
`Retry-After: 1`. Every request is timed, 429s included, so the figures are what the host saw.

The same list is downloaded twice, in the same run: with `--shard i/n --shard-by url` (the old
partition: every job holds its own per-host limits, so a host meets n adaptive limits), and with
`--shard i/n` (the host partition: each host's rows are in one job). Each time the n jobs run at
once as separate `imgclf download` processes (`--processes 1`), then `download --merge` joins them.

Printed per partition: the peak requests a host received in any one second (429s included), the
worst host's mean rate while it was being downloaded, 429 answers, rows not ok after the jobs' own
retries, and whether every input row is in the merged manifest exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import pandas as pd
from aiohttp import web
from PIL import Image


class RateLimitedHosts:
    """`hosts` aiohttp sites on 127.0.0.1 in one background event loop; each its own rate window."""

    def __init__(self, hosts: int, rate: int, latency: float) -> None:
        self.rate, self.latency = rate, latency
        self.ports: list[int] = []
        self.attempts: dict[int, list[float]] = collections.defaultdict(list)  # port -> request times
        self.rejected: collections.Counter[int] = collections.Counter()
        self._served: dict[int, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runners: list[web.AppRunner] = []
        self._hosts = hosts

    def __enter__(self) -> RateLimitedHosts:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            for runner in self._runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self) -> None:
        for _ in range(self._hosts):
            app = web.Application()
            app.router.add_get("/{name}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._runners.append(runner)
            self.ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def _handle(self, request: web.Request) -> web.Response:
        port = request.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        now = time.monotonic()
        self.attempts[port].append(now)
        served = self._served[port]
        while served and served[0] <= now - 1.0:
            served.popleft()
        if len(served) >= self.rate:
            self.rejected[port] += 1
            return web.Response(status=429, headers={"Retry-After": "1"})
        served.append(now)
        await asyncio.sleep(self.latency)
        return web.Response(body=_png(f"{port}/{request.match_info['name']}"), content_type="image/png")


def _png(name: str) -> bytes:
    """A distinct small image per URL (identical bodies would end as duplicates, not ok)."""
    seed = zlib.crc32(name.encode())
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (seed & 255, seed >> 8 & 255, seed >> 16 & 255)).save(buf, "PNG")
    return buf.getvalue()


def peak_per_second(times: list[float]) -> int:
    """Most requests within any one-second window (two pointers over the sorted times)."""
    times, best, lo = sorted(times), 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def run_partition(by: str, source: Path, jobs: int, work: Path, hosts: RateLimitedHosts) -> dict:
    """`jobs` jobs at once with `--shard-by by` (jobs == 1: one plain download, the baseline)."""
    hosts.attempts.clear()
    hosts.rejected.clear()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    started = time.monotonic()
    shard = (lambda i: ["--shard", f"{i}/{jobs}", "--shard-by", by]) if jobs > 1 else (lambda i: [])
    procs = [subprocess.Popen([sys.executable, "-m", "imgclf", "download", str(source), "--out", str(work / f"{by}{i}"),
                               *shard(i), "--processes", "1", "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(jobs)]
    notes = []
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"a --shard-by {by} job failed: {err[-2000:]}")
        notes += [line for line in err.splitlines() if "holds" in line]
    wall = time.monotonic() - started
    if jobs == 1:
        shutil.copytree(work / f"{by}0", work / f"{by}-merged")
    merge = [sys.executable, "-m", "imgclf", "download", "--merge",
             *[str(work / f"{by}{i}") for i in range(jobs)], "--out", str(work / f"{by}-merged"), "--no-progress"]
    merged = subprocess.CompletedProcess([], 0) if jobs == 1 else subprocess.run(merge, capture_output=True,
                                                                                 text=True, env=env)
    if merged.returncode != 0:
        raise SystemExit(f"--merge ({by}) failed: {merged.stderr[-2000:]}")
    manifest = pd.read_parquet(work / f"{by}-merged" / "manifest.parquet")
    rows = pd.read_csv(source)
    means = [len(t) / max(1e-9, max(t) - min(t) + 1e-9) for t in hosts.attempts.values() if len(t) > 1]
    return {"by": by, "wall_s": wall,
            "peak": max(peak_per_second(t) for t in hosts.attempts.values()),
            "mean": max(means), "requests": sum(len(t) for t in hosts.attempts.values()),
            "429": sum(hosts.rejected.values()), "not_ok": int((manifest["status"] != "ok").sum()),
            "rows_once": sorted(manifest["row"]) == list(range(len(rows))),
            "statuses": manifest["status"].value_counts().to_dict(), "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--hosts", type=int, default=6)
    ap.add_argument("--urls", type=int, default=400, help="URLs per host")
    ap.add_argument("--rate", type=int, default=100, help="requests per second a host serves; 429 above")
    ap.add_argument("--latency", type=float, default=0.02)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="polite-shards-"))
    try:
        with RateLimitedHosts(args.hosts, args.rate, args.latency) as hosts:
            urls = [f"http://127.0.0.1:{port}/{h}-{i}.png" for h, port in enumerate(hosts.ports)
                    for i in range(args.urls)]
            source = work / "urls.csv"
            pd.DataFrame({"url": urls, "label": [f"c{i % 2}" for i in range(len(urls))]}).to_csv(source, index=False)
            print(f"{args.jobs} jobs at once, {args.hosts} hosts x {args.urls} URLs, each host 429s above "
                  f"{args.rate} requests/s, {args.latency * 1000:.0f} ms latency")
            print(f"{'partition':<10} {'peak req/s':>10} {'mean req/s':>10} {'requests':>9} {'429s':>6} "
                  f"{'not ok':>7} {'rows once':>9} {'wall s':>7}")
            for by, jobs in (("one job", 1), ("url", args.jobs), ("host", args.jobs)):
                r = run_partition(by.replace(" ", "-"), source, jobs, work, hosts)
                print(f"{by:<10} {r['peak']:>10} {r['mean']:>10.1f} {r['requests']:>9} {r['429']:>6} "
                      f"{r['not_ok']:>7} {str(r['rows_once']):>9} {r['wall_s']:>7.1f}   {r['statuses']}")
                for note in r["notes"]:
                    print(f"           note: {note}")
            print("peak/mean req/s: the worst host, 429s included (a host's limit is "
                  f"{args.rate}/s); not ok: rows without an image after the jobs' own retries")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
