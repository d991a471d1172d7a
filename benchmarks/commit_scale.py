"""How fast the download's bookkeeping commits outcomes, without network (issue 25, item 1).

    .venv/bin/python benchmarks/commit_scale.py                       # 1,000,000 rows, shards of 1,000
    .venv/bin/python benchmarks/commit_scale.py --rows 10000000 --workers 2 --only parts

1. today: the real commit path. A resume state (download/_state.State) holds --rows pending
   URLs (inserted with one SQL statement: the CSV ingest is not what is measured here, see
   download_scale.py driver); the driver reads the pending list (`State.iter_pending`) and commits
   one synthetic ok outcome per URL (distinct sha256 and path, as content-addressed images have)
   with `State.record`, one transaction per shard of --shard-size: exactly what the Ray driver does
   per returned shard. Printed: rows/s overall and per tenth of the run (does it slow as the
   state grows?), state bytes per row.
2. the parts path (built, download/_parts.py; what `--engine ray` does since issue 25): --workers
   processes each turn a shard's pending URLs into synthetic outcomes and encode them with
   `Part.of` (what a Ray worker does), and the driver commits each part with `State.commit_part`
   (one row, one transaction per shard), reading the pending list with `State.iter_pending` and
   `iter_shards` as the Ray driver does. Printed: rows/s of the run, the driver's own time, then
   the time of `State.fold` (the bulk apply into `urls`, once at the end) and rows/s with it.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from imgclf.download._parts import Part  # noqa: E402
from imgclf.download._shards import iter_shards  # noqa: E402
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


def make_part(items: list[tuple[int, str]]) -> Part:
    """A worker: the shard's outcomes (one per URL, as ShardRunner returns them), encoded as a part."""
    outcomes = []
    for url_id, _ in items:
        sha = _sha(url_id)
        outcomes.append(Outcome(url_id, "ok", "", 200, 1, sha, f"images/{sha[:2]}/{sha}.jpg", 64, 64, 2000))
    return Part.of(outcomes)


def parts_path(work: Path, rows: int, shard_size: int, workers: int) -> None:
    state = State(work)
    started = time.monotonic()
    fill_pending(state, rows)
    print(f"state: {rows:,} pending URLs inserted in {time.monotonic() - started:.1f}s")
    started, cpu_started = time.monotonic(), time.process_time()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    driver_s, parts_bytes, done = 0.0, 0, 0

    def commit(part: Part) -> None:
        nonlocal driver_s, parts_bytes, done
        t = time.monotonic()
        state.commit_part(part)  # the driver's whole commit: one row, one transaction
        driver_s += time.monotonic() - t
        parts_bytes += len(part.data)
        done += part.rows

    # The pending list is read in this thread (SQLite's rule), a bounded window of shards in flight
    # (the Ray driver keeps OPEN_PER_WORKER per worker).
    window: deque = deque()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for shard in iter_shards(state.iter_pending(page=shard_size), shard_size):
            window.append(pool.apply_async(make_part, (shard.items,)))
            if len(window) >= 3 * workers:
                commit(window.popleft().get())
        while window:
            commit(window.popleft().get())
        pool.close()
        pool.join()  # (so that the workers' CPU time is counted below)
    run_s, driver_cpu = time.monotonic() - started, time.process_time() - cpu_started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers_cpu = (after.ru_utime + after.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    t, c = time.monotonic(), time.process_time()
    folded = state.fold()
    fold_s, fold_cpu = time.monotonic() - t, time.process_time() - c
    state.close()
    assert done == folded == rows, (done, folded, rows)
    size = (work / STATE_NAME).stat().st_size
    print(f"parts path ({workers} worker process(es) encode parts, the driver commits one row per shard): "
          f"{rows:,} rows in {run_s:.1f}s = {rows / run_s:,.0f} rows/s; the driver's commits "
          f"{driver_s:.2f}s = {rows / max(driver_s, 1e-9):,.0f} rows/s of driver capacity "
          f"({rows / shard_size / max(driver_s, 1e-9):,.0f} shards/s); parts {parts_bytes / rows:.0f} bytes/row")
    # CPU seconds do not depend on how many other processes share the cores (the shared machine's
    # load was 10-20 while these ran): they give the capacity of an idle core.
    print(f"  CPU: the driver {driver_cpu:.1f}s (reading the pending list, sending shards, committing) = "
          f"{rows / driver_cpu:,.0f} rows per driver CPU-second; the workers {workers_cpu:.1f}s = "
          f"{rows / workers_cpu:,.0f} rows per worker CPU-second (spawn start-up included)")
    print(f"  fold (State.fold, once at the end): {fold_s:.1f}s = {rows / fold_s:,.0f} rows/s ({fold_cpu:.1f} CPU-s = "
          f"{rows / fold_cpu:,.0f} rows per CPU-second); run + fold "
          f"{rows / (run_s + fold_s):,.0f} rows/s; state after the fold {size / rows:.0f} bytes/row")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", choices=("today", "parts"), default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="commit-scale-"))
    try:
        if args.only != "parts":
            (work / "today").mkdir()
            single_writer(work / "today", args.rows, args.shard_size)
        if args.only != "today":
            (work / "parts").mkdir()
            parts_path(work / "parts", args.rows, args.shard_size, args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
