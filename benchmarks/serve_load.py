"""Benchmark: `imgclf serve` under concurrent clients, PyTorch and ONNX Runtime backends.

    .venv/bin/python benchmarks/serve_load.py                          # shipped weights, 16 and 64 clients
    .venv/bin/python benchmarks/serve_load.py --baseline-src /tmp/old/src   # also the code in that tree

A real `imgclf serve` process on 127.0.0.1 per backend (the ONNX file is exported from the same
checkpoint in this run), hammered by one asyncio client (aiohttp) in this process: `--requests`
POSTs of real images (the bundled Fashion-MNIST test PNGs, raw image/png bodies) with at most
`--clients` in flight. Prints requests/s, p50 and p99 latency and the number of non-200 answers.
With --baseline-src, the same is run against a server started from that source tree (e.g.
`git archive <commit> src | tar -x -C /tmp/old`), back to back, so before/after ratios come from
one run on one machine. The client shares the machine's cores with the server: a floor, not a
ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEST = ROOT / "src" / "imgclf" / "demo_data" / "fashion_mnist" / "test"
SHIPPED = ROOT / "weights" / "fashion_mnist_mobilenet_v3_small.pt"


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(model: Path, src: Path | None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ)
    if src is not None:  # a server from another source tree (the baseline)
        env["PYTHONPATH"] = str(src)
    command = [sys.executable, "-m", "imgclf", "serve", "--model", str(model), "--port", str(port),
               "--max-concurrency", "1024"]  # measure throughput, not admission control (503s)
    # The server logs a line per request: to a file, since an unread pipe would fill and block it.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc, f"http://127.0.0.1:{port}"


async def _wait_healthy(base: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                proc.log.seek(0)  # type: ignore[attr-defined]
                raise RuntimeError(f"server exited: {proc.log.read()[-3000:]}")  # type: ignore[attr-defined]
            try:
                async with session.get(f"{base}/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
    raise TimeoutError(f"{base} never became healthy")


async def _hammer(base: str, bodies: list[bytes], total: int, clients: int) -> Result:
    latencies: list[float] = []
    errors = 0
    next_index = iter(range(total))
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def worker() -> None:
            nonlocal errors
            for i in next_index:
                start = time.perf_counter()
                async with session.post(f"{base}/predict", data=bodies[i % len(bodies)],
                                        headers={"content-type": "image/png"}) as resp:
                    await resp.read()
                    errors += resp.status != 200
                latencies.append(time.perf_counter() - start)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    latencies.sort()
    return Result(total / wall, statistics.median(latencies) * 1000,
                  latencies[max(0, int(0.99 * len(latencies)) - 1)] * 1000, errors)


async def _measure(model: Path, src: Path | None, bodies: list[bytes], total: int,
                   clients: list[int]) -> dict[int, Result]:
    proc, base = _start(model, src)
    try:
        await _wait_healthy(base, proc)
        await _hammer(base, bodies, min(total, 200), max(clients))  # warm-up: threads, allocator, arenas
        return {n: await _hammer(base, bodies, total, n) for n in clients}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        proc.log.close()  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHIPPED, help="run dir or checkpoint")
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64], help="requests in flight")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=("torch", "onnx"))
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="also measure a server run from this source tree (its src/ folder)")
    args = parser.parse_args()

    from imgclf.stages import export

    bodies = [p.read_bytes() for p in sorted(DEMO_TEST.rglob("*.png"))[:200]]
    trees = [("before", args.baseline_src)] if args.baseline_src else []
    trees.append(("now", None))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"torch": args.model}
        if "onnx" in args.backends:
            models["onnx"] = export.run(export.ExportOptions(args.model, "onnx", Path(tmp) / "model.onnx")).path
        for backend in args.backends:
            for label, src in trees:
                results = asyncio.run(_measure(models[backend], src, bodies, args.requests, args.clients))
                rows += [(backend, label, n, r) for n, r in results.items()]
                print(f"{backend} {label}: " + ", ".join(f"{n} clients {r.rps:.0f} req/s" for n, r in results.items()),
                      file=sys.stderr)

    print(f"model: {args.model}, {args.requests} requests per row, {len(bodies)} distinct PNG bodies; "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} (client on the same machine)")
    print("\n| backend | code | clients | requests/s | p50 ms | p99 ms | errors |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for backend, label, n, r in rows:
        print(f"| {backend} | {label} | {n} | {r.rps:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.errors} |")
    if args.baseline_src:
        print()
        for backend in args.backends:
            for n in args.clients:
                before, now = (next(r for b, lbl, c, r in rows if b == backend and lbl == which and c == n)
                               for which in ("before", "now"))
                print(f"{backend}, {n} clients: now / before requests/s {now.rps / before.rps:.2f}x, "
                      f"p99 {now.p99_ms / before.p99_ms:.2f}x")


if __name__ == "__main__":
    main()
