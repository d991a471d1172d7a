"""How fast the download's bookkeeping commits outcomes, without network (issue 25, item 1).

    .venv/bin/python benchmarks/commit_scale.py                       # 1,000,000 rows, shards of 1,000
    .venv/bin/python benchmarks/commit_scale.py --rows 10000000 --workers 2

1. today: the real commit path. A resume state (download/_state.State) holds --rows pending
   URLs (inserted with one SQL statement: the CSV ingest is not what is measured here, see
   download_scale.py driver); the driver reads the pending list (`State.iter_pending`) and commits
   one synthetic ok outcome per URL (distinct sha256 and path, as content-addressed images have)
   with `State.record`, one transaction per shard of --shard-size: exactly what the Ray driver does
   per returned shard. Printed: rows/s overall and per tenth of the run (does it slow as the
   state grows?), state bytes per row.
2. the scale-out design (NOT built into imgclf; a prototype of docs/scale.md's design): --workers
   processes each write their shards' outcomes as one Parquet part per shard (temporary name,
   then os.replace: a part exists whole or not at all), and the driver only records each shard's
   completion (one row per shard in SQLite, one transaction per shard). Printed: rows/s.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from imgclf.download._state import STATE_NAME, Outcome, State  # noqa: E402


def _sha(i: int) -> str:
    return hashlib.blake2b(i.to_bytes(8, "big"), digest_size=32).hexdigest()


def fill_pending(state: State, rows: int) -> None:
    """`rows` pending URLs, ids 1..rows, as an ingest leaves them (one statement, not the CSV path)."""
    state.db.execute("BEGIN")
    state.db.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
        "INSERT INTO urls(id, url, first_row) SELECT i, 'https://img' || (i % 5000) || '.example.com/p/' || i "
        "|| '.jpg', i - 1 FROM n", (rows,))
    state.db.execute("COMMIT")


def single_writer(work: Path, rows: int, shard_size: int) -> None:
    state = State(work)
    started = time.monotonic()
    fill_pending(state, rows)
    print(f"state: {rows:,} pending URLs inserted in {time.monotonic() - started:.1f}s")
    tenth, marks, batch, done = max(1, rows // 10), [], [], 0
    started = last = time.monotonic()
    for url_id, _ in state.iter_pending(page=shard_size):
        sha = _sha(url_id)
        batch.append(Outcome(url_id, "ok", "", 200, 1, sha, f"images/{sha[:2]}/{sha}.jpg", 64, 64, 2000))
        if len(batch) == shard_size:
            state.record(batch)  # one transaction per shard: the commit point
            done, batch = done + len(batch), []
            if done % tenth < shard_size:
                now = time.monotonic()
                marks.append(tenth / (now - last))
                last = now
    state.record(batch)
    elapsed = time.monotonic() - started
    state.close()
    size = (work / STATE_NAME).stat().st_size
    print(f"today (State.record, one driver): {rows:,} rows committed in {elapsed:.1f}s = "
          f"{rows / elapsed:,.0f} rows/s; state {size / rows:.0f} bytes/row")
    print("  rows/s per tenth of the run: " + ", ".join(f"{m:,.0f}" for m in marks))


def write_part(args: tuple[str, int, int, int]) -> tuple[int, int, str]:
    """A worker: one shard's outcomes as one Parquet part, published whole by os.replace."""
    parts, shard, first, count = args
    ids = list(range(first, first + count))
    shas = [_sha(i) for i in ids]
    table = pa.table({"url_id": ids, "status": ["ok"] * count, "error": [""] * count,
                      "http_status": [200] * count, "attempts": [1] * count, "sha256": shas,
                      "path": [f"images/{s[:2]}/{s}.jpg" for s in shas], "width": [64] * count,
                      "height": [64] * count, "bytes": [2000] * count})
    name = f"shard-{shard:09d}.parquet"
    tmp = Path(parts) / f".{name}.{os.getpid()}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, Path(parts) / name)
    return shard, count, name


def scale_out(work: Path, rows: int, shard_size: int, workers: int) -> None:
    parts = work / "parts"
    parts.mkdir(parents=True)
    db = sqlite3.connect(work / "driver.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE shards(shard INTEGER PRIMARY KEY, rows INTEGER NOT NULL, part TEXT NOT NULL)")
    jobs = [(str(parts), k, k * shard_size + 1, min(shard_size, rows - k * shard_size))
            for k in range((rows + shard_size - 1) // shard_size)]
    started = time.monotonic()
    driver_s = 0.0
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for shard, count, name in pool.imap_unordered(write_part, jobs, chunksize=4):
            t = time.monotonic()
            db.execute("BEGIN")  # the driver's whole commit: this shard is done
            db.execute("INSERT INTO shards VALUES (?, ?, ?)", (shard, count, name))
            db.execute("COMMIT")
            driver_s += time.monotonic() - t
    elapsed = time.monotonic() - started
    size = sum(p.stat().st_size for p in parts.iterdir()) + (work / "driver.sqlite").stat().st_size
    print(f"scale-out prototype ({workers} worker processes write per-shard parts, the driver records shards): "
          f"{rows:,} rows in {elapsed:.1f}s = {rows / elapsed:,.0f} rows/s; the driver's own time "
          f"{driver_s:.2f}s = {rows / max(driver_s, 1e-9):,.0f} rows/s of driver capacity "
          f"({len(jobs) / max(driver_s, 1e-9):,.0f} shards/s); parts + driver state {size / rows:.0f} bytes/row")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", choices=("today", "scale-out"), default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="commit-scale-"))
    try:
        if args.only != "scale-out":
            (work / "today").mkdir()
            single_writer(work / "today", args.rows, args.shard_size)
        if args.only != "today":
            scale_out(work / "scale", args.rows, args.shard_size, args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
