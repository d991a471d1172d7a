"""Benchmark `imgclf download` against img2dataset on the same URL list, in the same run.

    .venv/bin/python benchmarks/download.py --img2dataset /tmp/i2d/bin/python          # 20,000 images
    .venv/bin/python benchmarks/download.py --images 2000 --img2dataset /tmp/i2d/bin/python
    .venv/bin/python benchmarks/download.py --images 0 --rss-rows 1000000              # memory only
    # issue 23 item 5: 28x28 PNGs stored as they came, 2 processes x 128 in flight, the fetch ceiling
    .venv/bin/python benchmarks/download.py --as-is --processes 2 --concurrency 128 --ceiling \
        --img2dataset /tmp/i2d/bin/python --repeats 3 [--baseline-src /tmp/old/src]

A server process on 127.0.0.1 (aiohttp) serves N Fashion-MNIST images (from the idx files of the
Debian package dataset-fashion-mnist, upscaled to 112x112 JPEG files) with a per-request latency
(default 20 ms) and a 5% fault mix: 404, 500, HTML with 200, truncated JPEG, empty body, and a
request that never answers (0.5% of rows). Both tools get the same URL list, the same number of
processes, the same timeout and retries, and resize to the same 64 px side (JPEG quality 90).
images/s = validated images stored / wall time of the whole command (start-up included).
Peak RSS = largest sum of RSS over the tool's process tree (sampled every 50 ms).
img2dataset runs from its own venv (--img2dataset: that venv's python), so it cannot disturb ours.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle_boot"]
# Of every 200 rows, these positions are faults (10/200 = 5%); the rest are images.
FAULTS = {0: "404", 1: "404", 2: "500", 3: "500", 4: "html", 5: "html", 6: "truncated", 7: "truncated",
          8: "hang", 9: "empty"}


def load_fashion(n: int) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    reps = -(-n // len(images))
    return np.tile(images, (reps, 1, 1))[:n], np.tile(labels, reps)[:n]


def write_images(www: Path, n: int, png: bool = False) -> None:
    """N JPEG files of 112x112, or (png) the 28x28 grey originals as PNG; each distinct: the row
    number is drawn into a corner."""
    images, _ = load_fashion(n)
    www.mkdir(parents=True, exist_ok=True)
    for i, arr in enumerate(images):
        arr = arr.copy()
        arr[0, :20] = [(i >> b & 1) * 255 for b in range(20)]  # distinct content even when tiled
        if png:
            Image.fromarray(arr, "L").save(www / f"{i}.png", "PNG")
            continue
        img = Image.fromarray(arr, "L").resize((112, 112), Image.Resampling.BILINEAR).convert("RGB")
        img.save(www / f"{i}.jpg", "JPEG", quality=90)


def serve(www: str, latency: float, port_queue: multiprocessing.Queue) -> None:
    """The server process: files from memory, latency on every request, faults by path."""
    from aiohttp import web

    files = {p.name: p.read_bytes() for p in Path(www).iterdir() if p.suffix in (".jpg", ".png")}
    seen: dict[str, int] = {}  # requests per image path: GET /_counts tells how many were fetched twice

    async def counts(request: web.Request) -> web.Response:
        return web.json_response({"requests": sum(seen.values()), "images": len(seen),
                                  "refetched": sum(n - 1 for n in seen.values())})

    async def image(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(latency)
        kind, name = request.match_info["kind"], request.match_info["name"]
        if kind == "img":
            seen[name] = seen.get(name, 0) + 1
            return web.Response(body=files[name], content_type=_mime(name))
        if kind == "404":
            return web.Response(status=404, text="not found")
        if kind == "500":
            return web.Response(status=500, text="oops")
        if kind == "html":
            return web.Response(text="<!doctype html><html><body>gone</body></html>",
                                content_type="text/html")
        if kind == "truncated":
            return web.Response(body=files[name][:300], content_type="image/jpeg")
        if kind == "empty":
            return web.Response(body=b"", content_type="image/jpeg")
        await asyncio.sleep(3600)  # hang
        return web.Response(text="late")

    async def main() -> None:
        app = web.Application()
        app.add_routes([web.get("/_counts", counts), web.get("/{kind}/{name}", image)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port_queue.put(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def _mime(name: str) -> str:
    return "image/png" if name.endswith(".png") else "image/jpeg"


def write_urls(path: Path, base: str, n: int, fault_rate_on: bool = True, ext: str = "jpg") -> int:
    """The URL list; returns the number of rows that should end as a stored image."""
    _, labels = load_fashion(n) if n else (None, np.zeros(0, np.uint8))
    urls, good = [], 0
    for i in range(n):
        kind = FAULTS.get(i % 200, "img") if fault_rate_on else "img"
        good += kind == "img"
        urls.append(f"{base}/{kind}/{i}.{ext}")
    pd.DataFrame({"url": urls, "label": [CLASSES[v] for v in labels]}).to_csv(path, index=False)
    return good


def measure(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> tuple[float, int]:
    """Run `cmd`; return (wall seconds, peak RSS in bytes of its whole process tree)."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.monotonic() - started
    if log:
        out.close()
    if proc.returncode != 0:
        tail = log.read_text()[-2000:] if log else ""
        raise SystemExit(f"{cmd[0]} failed with {proc.returncode}:\n{tail}")
    return wall, peak


def run_imgclf(urls: Path, out: Path, args: argparse.Namespace, log: Path, extra: tuple[str, ...] = (),
               src: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "imgclf", "download", str(urls), "--out", str(out), "--no-progress"]
    if args.as_is:  # issue 23 item 5: C in flight per process, P processes, files stored as they came
        total = args.concurrency * args.processes
        cmd += ["--processes", str(args.processes), "--concurrency", str(total),
                "--timeout", str(args.timeout), "--retries", str(args.retries),
                "--resize", "none", "--image-format", "keep"]
        if args.fixed_per_host:  # else the adaptive per-host limit, as a user who sets no --per-host gets
            cmd += ["--per-host", str(total)]
    elif not args.default_flags:
        cmd += ["--processes", str(args.processes), "--concurrency", str(args.concurrency),
                "--per-host", str(args.concurrency), "--timeout", str(args.timeout),
                "--retries", str(args.retries),
                "--resize", "shorter", "--size", str(args.size), "--format", "jpeg", "--quality", "90"]
    cmd += list(extra)
    env = {**os.environ, "PYTHONPATH": src} if src else None  # --baseline-src: another tree's imgclf
    wall, peak = measure(cmd, env=env, log=log)
    manifest = pd.read_parquet(out / "manifest.parquet", columns=["status"])
    counts = manifest["status"].value_counts().to_dict()
    fetch_s = json.loads((out / "download_report.json").read_text()).get("fetch_s", 0.0)
    return {"wall_s": wall, "peak_rss": peak, "ok": counts.get("ok", 0), "rows": len(manifest),
            "accounted": len(manifest) - counts.get("pending", 0), "counts": counts, "fetch_s": fetch_s}


def run_img2dataset(urls: Path, out: Path, args: argparse.Namespace, log: Path) -> dict:
    as_is = (
        f", output_format='files', processes_count={args.processes}, thread_count={args.concurrency}, "
        f"resize_mode='no', disable_all_reencoding=True, timeout={args.timeout}, retries={args.retries}, "
        "number_sample_per_shard=1000, enable_wandb=False, distributor='multiprocessing'")
    matched = (
        f", output_format='files', processes_count={args.processes}, "
        f"thread_count={args.concurrency}, image_size={args.size}, resize_mode='keep_ratio', "
        f"resize_only_if_bigger=True, encode_format='jpg', encode_quality=90, timeout={args.timeout}, "
        f"retries={args.retries}, number_sample_per_shard=1000, enable_wandb=False, "
        "distributor='multiprocessing'")
    code = (
        "from img2dataset import download\n"
        f"download(url_list={str(urls)!r}, output_folder={str(out)!r}, input_format='csv', url_col='url', "
        f"caption_col='label'{'' if args.default_flags else as_is if args.as_is else matched})\n")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    wall, peak = measure([args.img2dataset, "-c", code], env=env, log=log)
    ok = rows = 0
    for stats in out.glob("*_stats.json"):
        data = json.loads(stats.read_text())
        ok += data["successes"]
        rows += data["count"]
    return {"wall_s": wall, "peak_rss": peak, "ok": ok, "rows": rows, "accounted": rows}


def _bare_fetch(urls: list[str], in_flight: int) -> None:
    """One process of the fetch ceiling: aiohttp, `in_flight` requests at a time, each body read whole
    and dropped (no validation, hashing, storing or bookkeeping)."""
    import aiohttp

    async def main() -> None:
        todo = iter(urls)
        connector = aiohttp.TCPConnector(limit=in_flight, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def loop() -> None:
                for url in todo:
                    async with session.get(url) as resp:
                        await resp.read()
            await asyncio.gather(*(loop() for _ in range(in_flight)))

    asyncio.run(main())


def run_ceiling(urls: Path, args: argparse.Namespace) -> dict:
    """The fetch ceiling: the same URLs, split over P forked processes of C requests in flight each."""
    rows = pd.read_csv(urls)["url"].tolist()
    ctx = multiprocessing.get_context("fork")
    started = time.monotonic()
    procs = [ctx.Process(target=_bare_fetch, args=(rows[i::args.processes], args.concurrency))
             for i in range(args.processes)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    wall = time.monotonic() - started
    if any(proc.exitcode for proc in procs):
        raise SystemExit("bare fetch failed")
    return {"wall_s": wall, "peak_rss": 0, "ok": len(rows), "rows": len(rows), "accounted": len(rows)}


def _compare(urls: Path, work: Path, args: argparse.Namespace) -> dict[str, dict]:
    """One round: each tool once, one after the other, against the same server, each into a new folder.

    The last round's output is deleted first, then the disk synced and left alone for a few seconds:
    measured here, a run right after `rm -rf` of 20,000 files paid 3-5x the kernel time per file it
    created (ext4 still freeing the deleted ones), which no user's first download pays."""
    outputs = ("i2d", "imgclf_before", "imgclf")
    for name in outputs:
        shutil.rmtree(work / name, ignore_errors=True)
    os.sync()
    time.sleep(3)
    results = {}
    if args.ceiling:
        results["bare fetch"] = run_ceiling(urls, args)
    if args.img2dataset:
        results["img2dataset"] = run_img2dataset(urls, work / "i2d", args, work / "i2d.log")
    if args.baseline_src:
        results["imgclf before"] = run_imgclf(urls, work / "imgclf_before", args, work / "imgclf_before.log",
                                              src=args.baseline_src)
    results["imgclf"] = run_imgclf(urls, work / "imgclf", args, work / "imgclf.log")
    return results


def _print_round(round_no: int, results: dict[str, dict], n: int) -> None:
    print(f"round {round_no}, load average {os.getloadavg()[0]:.1f} after it")
    for name, r in results.items():
        print(f"  {name:12s} {r['ok'] / r['wall_s']:8.1f} images/s  ok {r['ok']:6d}  "
              f"wall {r['wall_s']:6.2f}s  peak RSS {r['peak_rss'] / 2**20:6.0f} MiB  "
              f"rows accounted {r['accounted']}/{n}")
    ours = results["imgclf"]["ok"] / results["imgclf"]["wall_s"]
    for other in ("img2dataset", "bare fetch", "imgclf before"):
        if other in results:
            theirs = results[other]["ok"] / results[other]["wall_s"]
            print(f"  imgclf / {other}: {ours / max(theirs, 1e-9):.2f}x")
    print(f"  imgclf statuses: {results['imgclf']['counts']}; its fetch loop {results['imgclf']['fetch_s']:.2f} s "
          f"of the {results['imgclf']['wall_s']:.2f} s (the rest: start-up, reading the list, manifest, report)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000, help="rows in the comparison (0: skip it)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds per request (default 0.02)")
    parser.add_argument("--no-faults", action="store_true", help="no 5%% fault mix")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="output side for both tools")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--retries", type=int, default=1)
    parser.add_argument("--default-flags", action="store_true",
                        help="run both tools with their default flags (only input, output and columns given)")
    parser.add_argument("--img2dataset", default="", help="python of a venv with img2dataset (skip if empty)")
    parser.add_argument("--rss-rows", type=int, default=0,
                        help="also run imgclf alone on this many rows of fast 404s (memory of the row path)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--as-is", action="store_true",
                        help="issue 23 item 5's setting: the 28x28 PNGs, no faults, stored as they came; "
                             "--concurrency is then per process (img2dataset's threads), imgclf gets P x C")
    parser.add_argument("--ceiling", action="store_true",
                        help="also time a bare aiohttp fetch of the same URLs (P processes x C in flight)")
    parser.add_argument("--repeats", type=int, default=1, help="run the comparison this many times")
    parser.add_argument("--baseline-src", default="",
                        help="also run imgclf from this src folder (git archive OLD src | tar -x -C DIR)")
    parser.add_argument("--fixed-per-host", action="store_true",
                        help="with --as-is: imgclf --per-host = its whole concurrency (no adaptive limit)")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="imgclf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    www = work / ("www_png" if args.as_is else "www")
    ext = "png" if args.as_is else "jpg"
    n_files = max(args.images, 1)
    if len(list(www.glob(f"*.{ext}"))) < n_files:
        t = time.monotonic()
        write_images(www, n_files, png=args.as_is)
        print(f"wrote {n_files} images in {time.monotonic() - t:.0f}s")
    ports: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(str(www), args.latency, ports), daemon=True)
    server.start()
    base = f"http://127.0.0.1:{ports.get(timeout=60)}"
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start; "
          f"latency {args.latency * 1000:.0f} ms, "
          + ("default flags" if args.default_flags else f"processes {args.processes}, concurrency {args.concurrency}"
             + (" per process, stored as they came" if args.as_is else "")))
    try:
        if args.images:
            urls = work / "urls.csv"
            good = write_urls(urls, base, args.images, not (args.no_faults or args.as_is), ext)
            print(f"{args.images} rows, {good} valid images, {args.images - good} faults")
            for round_no in range(1, args.repeats + 1):
                _print_round(round_no, _compare(urls, work, args), args.images)
        if args.rss_rows:
            urls = work / "rss.csv"
            pd.DataFrame({"url": [f"{base}/404/{i}.jpg" for i in range(args.rss_rows)], "label": "x"}
                         ).to_csv(urls, index=False)
            shutil.rmtree(work / "rss", ignore_errors=True)
            r = run_imgclf(urls, work / "rss", args, work / "rss.log")
            print(f"rss: {args.rss_rows} rows (distinct URLs, all answered 404 after "
                  f"{args.latency * 1000:.0f} ms): "
                  f"wall {r['wall_s']:.0f}s ({args.rss_rows / r['wall_s']:.0f} rows/s), "
                  f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB (process tree), "
                  f"rows accounted {r['accounted']}/{args.rss_rows}")
    finally:
        server.terminate()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
