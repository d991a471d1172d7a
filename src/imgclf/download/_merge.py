"""`imgclf download --merge JOB_DIR... --out DATA_DIR`: join the data directories of `--shard i/n` jobs.

    imgclf download urls.csv --out part0 --shard 0/2     # job 0, e.g. one SLURM array task
    imgclf download urls.csv --out part1 --shard 1/2     # job 1, anywhere else
    imgclf download --merge part0 part1 --out data       # one DATA_DIR, as if downloaded at once

Each job's resume state already holds its rows under their input row numbers, with their
outcomes; the merge copies both into a new state (SQLite ATTACH, no Python loop over rows),
links (or copies) the stored images and tar shards, then writes the manifest and report with the
same code as a download. So duplicates across jobs (same content from two URLs), leakage and
every count come out exactly as one run would give them. Tar shards are renumbered (every job
numbers its own from 0); their bytes and offsets are unchanged.

Refused, with one line: a job still running (its lock is held), jobs downloaded with different
options, a job missing or given twice, an --out that is one of the jobs, object-storage folders.
The merged DATA_DIR resumes like any other: `imgclf download urls.csv --out data` fetches only
what the jobs left pending.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import time
from pathlib import Path

from imgclf import storage
from imgclf.download._options import DownloadOptions
from imgclf.download._report import write_outputs
from imgclf.download._sink import next_shard_number
from imgclf.download._state import STATE_NAME, State
from imgclf.download._writers import shard_name
from imgclf.errors import ConfigError, DataError

_JOB = re.compile(r" shard=(\d+)/(\d+)$")


def merge(job_dirs: list[Path], out_dir: Path | str, options: DownloadOptions | None = None):  # noqa: ANN201
    """Merge the DATA_DIRs of --shard jobs into `out_dir`; returns a download.DownloadResult."""
    from imgclf.download._result import DownloadResult

    options = options or DownloadOptions()
    started = time.monotonic()
    out = Path(os.fspath(out_dir))
    jobs = [Path(os.fspath(d)) for d in job_dirs]
    key = _check_jobs(jobs, out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / STATE_NAME).exists():
        raise DataError(f"{out}: already a data directory; merge into a new --out")
    state = State(out)
    try:
        state.check_storage(key, out)
        for index, job in enumerate(jobs):
            _merge_one(state, job, out, index)
        extra = {"merged_from": [str(j) for j in jobs], "options": key, "skipped": state.skipped_report()}
        manifest, report_path, report = write_outputs(state, out, extra)
    finally:
        state.close()
    if options.print_summary:
        from rich.console import Console

        from imgclf.download._report import print_summary

        print_summary(report, Console())
    return DownloadResult(report["total_rows"], dict(report["counts"]), manifest, report_path, report, 0,
                          time.monotonic() - started)


def _check_jobs(jobs: list[Path], out: Path) -> str:
    """The storage key the jobs share (without their shard); a one-line error for any bad set."""
    if not jobs:
        raise DataError("download --merge: give the data directories of the --shard jobs")
    if storage.is_url(os.fspath(out)) or any(storage.is_url(os.fspath(j)) for j in jobs):
        raise ConfigError("download --merge: local folders only (merge on a machine that has the jobs' folders)")
    keys, seen = set(), {}
    for job in jobs:
        if not (job / STATE_NAME).is_file():
            raise DataError(f"{job}: not a data directory of `imgclf download` (no {STATE_NAME})")
        if job.resolve() == out.resolve():
            raise DataError(f"{job}: --out must be a new folder, not one of the jobs")
        _check_not_running(job)
        State(job).close()  # opening a state applies the parts a killed job committed (see _parts)
        with sqlite3.connect(f"file:{job / STATE_NAME}?mode=ro", uri=True) as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'storage'").fetchone()
        match = _JOB.search(row[0]) if row else None
        if match is None:
            raise DataError(f"{job}: not downloaded with --shard i/n; nothing to merge")
        index, count = int(match.group(1)), int(match.group(2))
        if index in seen:
            raise DataError(f"{job}: job {index}/{count} is given twice (also {seen[index]})")
        seen[index] = job
        keys.add((row[0][: match.start()], count))
    if len(keys) > 1:
        raise DataError("download --merge: the jobs were downloaded with different options or job counts: "
                        + "; ".join(sorted(f"{k} (n={n})" for k, n in keys)))
    key, count = keys.pop()
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        raise DataError(f"download --merge: job(s) {', '.join(f'{i}/{count}' for i in missing)} missing; "
                        "their rows would be absent from the manifest")
    return key


def _check_not_running(job: Path) -> None:
    try:
        import fcntl
    except ImportError:
        return
    with open(job / (STATE_NAME + ".lock"), "ab") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DataError(f"{job}: its download is still running; merge when it has finished") from None
        fcntl.flock(handle, fcntl.LOCK_UN)


def _columns(db: sqlite3.Connection, schema: str, table: str) -> list[str]:
    return [r[1] for r in db.execute(f"PRAGMA {schema}.table_info({table})")]


def _merge_one(state: State, job: Path, out: Path, index: int) -> None:
    """Copy one job's rows, outcomes and skipped files into the merged state; link its images."""
    db = state.db
    db.execute("ATTACH DATABASE ? AS job", (f"file:{job / STATE_NAME}?mode=ro",))
    try:
        shards = _renumber_shards(db)
        cols = [c for c in _columns(db, "job", "urls") if c != "id" and c in _columns(db, "main", "urls")]
        picked = ", ".join("COALESCE(m.new, u.shard)" if c == "shard" else f"u.{c}" for c in cols)
        db.execute("BEGIN")
        db.execute("CREATE TEMP TABLE shard_map(old TEXT PRIMARY KEY, new TEXT NOT NULL)")
        db.executemany("INSERT INTO shard_map VALUES (?, ?)", shards.items())
        db.execute("INSERT INTO rows(row, source, url, label, split) SELECT row, source, url, label, split "
                   "FROM job.rows")
        db.execute(f"INSERT INTO urls({', '.join(cols)}) SELECT {picked} FROM job.urls u "
                   "LEFT JOIN shard_map m ON m.old = u.shard WHERE u.first_row IS NOT NULL"
                   if "shard" in cols else
                   f"INSERT INTO urls({', '.join(cols)}) SELECT {picked} FROM job.urls u WHERE u.first_row IS NOT NULL")
        db.execute("DROP TABLE temp.shard_map")
        db.execute("INSERT INTO skipped SELECT * FROM job.skipped s WHERE NOT EXISTS (SELECT 1 FROM main.skipped m "
                   "WHERE m.source = s.source AND m.path = s.path)")
        db.execute("COMMIT")
        files = [p for (p,) in db.execute("SELECT DISTINCT path FROM job.urls WHERE status = 'ok' AND shard = ''")]
    except sqlite3.IntegrityError as err:
        db.execute("ROLLBACK")
        raise DataError(f"{job}: overlaps a job merged before it ({err}); were both run with the same --shard?") \
            from None
    finally:
        db.execute("DETACH DATABASE job")
    for rel in files:
        _link(job / storage.confined(rel), out / storage.confined(rel))
    for old, new in shards.items():
        _link(job / storage.confined(old), out / storage.confined(new))


def _renumber_shards(db: sqlite3.Connection) -> dict[str, str]:
    """job's tar name -> a new name after the shards already merged (every job numbers from 0)."""
    if "shard" not in _columns(db, "job", "urls"):
        return {}
    first = next_shard_number({n for (n,) in db.execute("SELECT DISTINCT shard FROM main.urls WHERE shard <> ''")})
    return {old: shard_name(first + i) for i, (old,) in enumerate(
        db.execute("SELECT DISTINCT shard FROM job.urls WHERE shard <> '' ORDER BY shard"))}


def _link(src: Path, dst: Path) -> None:
    """Hard-link a stored file into the merged folder (a copy across file systems)."""
    if dst.exists():
        return  # content-addressed: the same name is the same bytes
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
