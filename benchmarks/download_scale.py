"""Benchmark the Ray engine of `imgclf download` against the single process, in the same run.

    .venv/bin/python benchmarks/download_scale.py overhead --images 20000 --rounds 3  # Ray 1 worker vs local
    .venv/bin/python benchmarks/download_scale.py scaling --images 4000 --latency 0.2 --concurrency 16
    .venv/bin/python benchmarks/download_scale.py kill-worker --images 6000 --latency 0.05
    .venv/bin/python benchmarks/download_scale.py kill-driver --images 6000 --latency 0.05

The server and the URL list are benchmarks/download.py's (112x112 JPEGs on 127.0.0.1, a latency
per request; here without the fault mix unless --faults). Every run is the real CLI
(`python -m imgclf download ... [--engine ray --workers N]`).
- overhead: today's single process, then Ray with 1 worker (a private local Ray, started and
  stopped by the command: its start-up is in the wall time), alternated for --rounds.
- scaling: Ray with 1 worker, then 2, each worker capped at --concurrency requests in flight.
Two rates per run: images/s over the wall time of the whole command, and the steady rate: rows
committed per second between 20% and 80% of the rows (Ray's start-up and the slowest last URLs
excluded), sampled from the resume state every 0.25 s.
- kill-worker / kill-driver: Ray with 2 workers; when 30% of the rows are committed, SIGKILL one
  worker process (Ray restarts it) or the driver (then the same command again); the server counts
  the image URLs it was asked for more than once: the rows the kill cost.
- driver: no network; what the driver's single writer sustains: ingest --images rows into a
  resume state, then commit one ok outcome per URL in shards of --shard-size (State.record, one
  transaction each), and the state's size per row (for the 1-billion-row plan in docs/scale.md).

    .venv/bin/python benchmarks/download_scale.py driver --images 2000000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import psutil

_spec = importlib.util.spec_from_file_location("bench_download", Path(__file__).with_name("download.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # type: ignore[union-attr]


def cli(urls: Path, out: Path, args: argparse.Namespace, workers: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "imgclf", "download", str(urls), "--out", str(out), "--no-progress",
           "--concurrency", str(args.concurrency), "--timeout", str(args.timeout), "--retries", str(args.retries),
           "--resize", "shorter", "--size", "64", "--image-format", "jpeg", "--shard-size", str(args.shard_size)]
    if args.processes:
        cmd += ["--processes", str(args.processes)]
    if workers is not None:
        cmd += ["--engine", "ray", "--workers", str(workers)]
    return cmd


def result(out: Path, wall: float) -> dict:
    report = json.loads((out / "download_report.json").read_text())
    ok = report["counts"].get("ok", 0)
    return {"ok": ok, "wall_s": wall, "images_per_s": ok / wall, "fetch_images_per_s": report["images_per_s"],
            "rows": report["total_rows"]}


def committed(out: Path) -> int:
    try:
        with sqlite3.connect(f"file:{out / '.state.sqlite'}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM urls WHERE status IS NOT NULL").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def server_counts(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/_counts") as resp:
        return json.loads(resp.read())


def run(label: str, cmd: list[str], out: Path, work: Path) -> dict:
    """Run the command; besides wall and peak RSS, the steady rate: rows committed per second
    between 20% and 80% of the rows (start-up and the last slow URLs excluded)."""
    shutil.rmtree(out, ignore_errors=True)
    with open(work / f"{out.name}.log", "w") as log:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        samples, peak, root = [], 0, psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
            except psutil.Error:
                pass
            samples.append((time.monotonic(), committed(out)))
            time.sleep(0.25)
        wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed: {(work / f'{out.name}.log').read_text()[-2000:]}")
    r = result(out, wall)
    r |= {"peak_rss": peak, "steady": _steady(samples, r["rows"])}
    print(f"{label:22s} {r['images_per_s']:7.1f} images/s (wall {wall:6.1f}s)  steady {r['steady']:7.1f} rows/s  "
          f"ok {r['ok']}/{r['rows']}  peak RSS {peak / 2**20:5.0f} MiB", flush=True)
    return r


def _steady(samples: list[tuple[float, int]], rows: int) -> float:
    """Rows/s between the first samples at or past 20% and 80% of the rows committed."""
    low = next(((t, n) for t, n in samples if n >= 0.2 * rows), None)
    high = next(((t, n) for t, n in samples if n >= 0.8 * rows), None)
    if low is None or high is None or high[0] <= low[0]:
        return float("nan")
    return (high[1] - low[1]) / (high[0] - low[0])


def kill_run(kind: str, urls: Path, out: Path, args: argparse.Namespace, base: str, total: int) -> None:
    shutil.rmtree(out, ignore_errors=True)
    cmd = cli(urls, out, args, 2)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while committed(out) < 0.3 * total and proc.poll() is None:
        time.sleep(0.05)
    before = committed(out)
    if kind == "worker":
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::_Worker")]
        os.kill(workers[0].pid, signal.SIGKILL)
        proc.wait()
    else:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(2)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    counts = server_counts(base)
    report = json.loads((out / "download_report.json").read_text())
    r = {"ok": report["counts"].get("ok", 0), "rows": report["total_rows"]}
    print(f"kill {kind}: rows committed at the kill {before}/{total}; after the run{'s' if kind == 'driver' else ''} "
          f"ok {r['ok']}/{r['rows']}; image URLs fetched more than once: {counts['refetched']} "
          f"(shard size {args.shard_size}, 2 workers, at most {3 * args.shard_size} rows open per worker)")


def driver(args: argparse.Namespace, work: Path) -> None:
    from imgclf.download._state import Outcome, State

    urls = work / "driver.csv"
    pd.DataFrame({"url": [f"https://img{i % 5000}.example.com/p/{i:09d}.jpg" for i in range(args.images)],
                  "label": "x"}).to_csv(urls, index=False)
    shutil.rmtree(work / "driver", ignore_errors=True)
    (work / "driver").mkdir()
    state = State(work / "driver")
    started = time.monotonic()
    state.ingest([urls], 50_000)
    ingest_s = time.monotonic() - started
    sha = "ab" * 32
    started = time.monotonic()
    batch = []
    for url_id, _ in state.iter_pending():
        batch.append(Outcome(url_id, "ok", "", 200, 1, sha, f"images/ab/{sha}.jpg", 64, 64, 2000))
        if len(batch) == args.shard_size:
            state.record(batch)
            batch = []
    state.record(batch)
    commit_s = time.monotonic() - started
    state.close()
    size = (work / "driver" / ".state.sqlite").stat().st_size
    print(f"driver: {args.images} rows ingested in {ingest_s:.1f}s ({args.images / ingest_s:,.0f} rows/s); "
          f"committed in shards of {args.shard_size} in {commit_s:.1f}s ({args.images / commit_s:,.0f} rows/s, "
          f"reading the pending list included); state {size / 2**20:.0f} MiB = {size / args.images:.0f} bytes/row; "
          f"peak RSS {psutil.Process().memory_info().rss / 2**20:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("overhead", "scaling", "kill-worker", "kill-driver", "driver"))
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--faults", action="store_true", help="the 5%% fault mix of benchmarks/download.py")
    parser.add_argument("--processes", type=int, default=0, help="decode processes (0: the default)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight per worker")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--retries", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="overhead: alternated rounds (median ratio)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="imgclf-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.mode == "driver":
        driver(args, work)
        return
    www = work / "www"
    if len(list(www.glob("*.jpg"))) < args.images:
        bench.write_images(www, args.images)
    ports: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=bench.serve, args=(str(www), args.latency, ports), daemon=True)
    server.start()
    base = f"http://127.0.0.1:{ports.get(timeout=60)}"
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start; {args.images} "
          f"URLs, latency {args.latency * 1000:.0f} ms, concurrency {args.concurrency} per worker, "
          f"shard size {args.shard_size}", flush=True)
    try:
        urls = work / "urls.csv"
        bench.write_urls(urls, base, args.images, args.faults)
        if args.mode == "overhead":  # alternated, so a change of load hits both alike
            ratios = []
            for i in range(args.rounds):
                local = run(f"single process #{i + 1}", cli(urls, work / "local", args, None), work / "local", work)
                ray1 = run(f"ray, 1 worker #{i + 1}", cli(urls, work / "ray1", args, 1), work / "ray1", work)
                ratios.append((ray1["images_per_s"] / local["images_per_s"], ray1["steady"] / local["steady"]))
                print(f"ratio ray 1 worker / single process, round {i + 1}: {ratios[-1][0]:.2f}x (wall), "
                      f"{ratios[-1][1]:.2f}x (steady)", flush=True)
            mid = len(ratios) // 2
            print(f"median ratio over {args.rounds} rounds: {sorted(r[0] for r in ratios)[mid]:.2f}x (wall), "
                  f"{sorted(r[1] for r in ratios)[mid]:.2f}x (steady)")
        elif args.mode == "scaling":
            one = run("ray, 1 worker", cli(urls, work / "ray1", args, 1), work / "ray1", work)
            two = run("ray, 2 workers", cli(urls, work / "ray2", args, 2), work / "ray2", work)
            print(f"ratio 2 workers / 1: {two['steady'] / one['steady']:.2f}x (steady), "
                  f"{two['images_per_s'] / one['images_per_s']:.2f}x (wall)")
        else:
            kill_run(args.mode.split("-")[1], urls, work / "kill", args, base, args.images)
    finally:
        server.terminate()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
