"""Resume state: DATA_DIR/.state.sqlite (SQLite in WAL mode), the durable truth of a download.

Two tables. `rows` is the input, one line per input row (re-read when the sources change).
`urls` holds one line per distinct URL with its outcome: `status` NULL means not finished.
A result is committed only after its image file is in place, so after a kill (even SIGKILL)
a URL is either finished, with its file, or fetched again; a finished URL is never fetched
again. The manifest is a join of the two, streamed in row order.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from imgclf import sources
from imgclf.net.http import check_url
from imgclf.download._fetch import RETRY_STATUSES
from imgclf.errors import ConfigError, DataError

STATE_NAME = ".state.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS urls(
    id INTEGER PRIMARY KEY, url TEXT NOT NULL UNIQUE, first_row INTEGER,
    status TEXT, error TEXT NOT NULL DEFAULT '', http_status INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, sha256 TEXT NOT NULL DEFAULT '', path TEXT NOT NULL DEFAULT '',
    width INTEGER NOT NULL DEFAULT 0, height INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS urls_by_sha ON urls(sha256) WHERE sha256 <> '';
CREATE TABLE IF NOT EXISTS rows(row INTEGER PRIMARY KEY, source TEXT NOT NULL, url TEXT NOT NULL,
                                label TEXT NOT NULL, split TEXT NOT NULL);
"""

_UPSERT_URL = """
INSERT INTO urls(url, first_row, status, error) VALUES (?, ?, ?, ?)
ON CONFLICT(url) DO UPDATE SET first_row = excluded.first_row WHERE urls.first_row IS NULL
"""

# Manifest rows in input order with what is needed to resolve duplicates: the first row that
# holds the same URL (urls.first_row) and the first row that holds the same stored content.
_MANIFEST_QUERY = """
WITH first_by_sha AS (
    SELECT sha256, MIN(first_row) AS first FROM urls
    WHERE status = 'ok' AND first_row IS NOT NULL GROUP BY sha256)
SELECT r.row, r.source, r.url, r.label, r.split, u.status, u.error, u.http_status, u.attempts,
       u.sha256, u.path, u.width, u.height, u.bytes, u.first_row, f.first
FROM rows r LEFT JOIN urls u ON u.url = r.url AND r.label <> ''
LEFT JOIN first_by_sha f ON u.status = 'ok' AND f.sha256 = u.sha256
ORDER BY r.row
"""

_SHARED_IMAGES_QUERY = """
SELECT u.sha256, COUNT(DISTINCT r.split), COUNT(DISTINCT r.label), MIN(r.row), COUNT(*),
       GROUP_CONCAT(DISTINCT r.split), GROUP_CONCAT(DISTINCT r.label)
FROM rows r JOIN urls u ON u.url = r.url WHERE u.status = 'ok' AND r.label <> ''
GROUP BY u.sha256 HAVING COUNT(DISTINCT r.split) > 1 OR COUNT(DISTINCT r.label) > 1
"""


@dataclass(frozen=True)
class Outcome:
    """The result of one URL, as stored."""

    url_id: int
    status: str
    error: str = ""
    http_status: int = 0
    attempts: int = 0
    sha256: str = ""
    path: str = ""
    width: int = 0
    height: int = 0
    bytes: int = 0


def _fingerprint(paths: list[Path]) -> str:
    items = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            raise DataError(f"{path}: source file not found") from None
        items.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return json.dumps(items)


def _lock_dir(data_dir: Path) -> IO[bytes] | None:
    """One download per DATA_DIR at a time; the kernel drops the lock when the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    handle = open(data_dir / (STATE_NAME + ".lock"), "wb")  # noqa: SIM115 - held for the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DataError(f"{data_dir}: another `imgclf download` is writing here; wait for it or use "
                        "another --out") from None
    return handle


class State:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / STATE_NAME
        self._lock = _lock_dir(data_dir)
        db: sqlite3.Connection | None = None
        try:
            # isolation_level=None: we open transactions ourselves, one per batch.
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process (not a power cut) without an fsync per commit.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except BaseException as err:
            # Release the database and the flock, or this process would keep DATA_DIR locked.
            if db is not None:
                db.close()
            if self._lock is not None:
                self._lock.close()
            if isinstance(err, sqlite3.DatabaseError):
                raise DataError(f"{self.path}: unusable resume state ({err}); delete it to start over") from None
            raise
        self.db = db

    def close(self) -> None:
        self.db.close()
        if self._lock is not None:
            self._lock.close()  # releases the flock

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def begin_run(self) -> bool:
        """Mark a run as started; True when the previous one never finished (killed)."""
        crashed = self._meta("running") is not None
        self._set_meta("running", "1")
        return crashed

    def end_run(self) -> None:
        self.db.execute("DELETE FROM meta WHERE key = 'running'")

    def check_storage(self, key: str, data_dir: Path) -> None:
        """A resumed run must store images the same way, or the data directory would mix two."""
        previous = self._meta("storage")
        if previous is not None and previous != key:
            raise ConfigError(f"{data_dir} was downloaded with {previous}; now {key}. "
                              "Use the same options, or another --out")
        self._set_meta("storage", key)

    def ingest(self, paths: list[Path], chunk_rows: int) -> int:
        """Load the input rows unless this exact input was already loaded; return the row count."""
        fingerprint = _fingerprint(paths)
        if self._meta("ingested") == fingerprint:
            return self.db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
        self.db.execute("BEGIN")
        self.db.execute("DELETE FROM meta WHERE key = 'ingested'")
        self.db.execute("DELETE FROM rows")
        self.db.execute("UPDATE urls SET first_row = NULL")  # URLs that left the input are not fetched
        self.db.execute("COMMIT")
        total = 0
        for chunk in sources.iter_sources(paths, chunk_rows=chunk_rows):
            self._ingest_chunk(chunk)
            total += len(chunk)
        self.db.execute("BEGIN")
        self._set_meta("ingested", fingerprint)
        self.db.execute("COMMIT")
        return total

    def _ingest_chunk(self, chunk) -> None:  # noqa: ANN001 - a pandas frame from sources.iter_sources
        problems: dict[str, str] = {}
        url_rows = []
        for row, url, label in zip(chunk["row"].tolist(), chunk["url"].tolist(), chunk["label"].tolist(),
                                   strict=True):
            if not label:
                continue  # status missing_label, set per row in the manifest; its URL is not fetched
            if url not in problems:
                problems[url] = check_url(url)
            problem = problems[url]
            url_rows.append((url, row, "invalid_url" if problem else None, problem))
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO rows(row, source, url, label, split) VALUES (?, ?, ?, ?, ?)",
                            zip(*(chunk[c].tolist() for c in ("row", "source", "url", "label", "split")),
                                strict=True))
        self.db.executemany(_UPSERT_URL, url_rows)
        self.db.execute("COMMIT")

    def reopen_retryable(self) -> int:
        """--retry-failed: make failures that may go differently next time pending again."""
        codes = ",".join(str(c) for c in sorted(RETRY_STATUSES))
        self.db.execute("BEGIN")
        cur = self.db.execute(
            "UPDATE urls SET status = NULL WHERE first_row IS NOT NULL AND (status IN ('timeout', "
            f"'connection_error') OR (status = 'http_error' AND http_status IN (0,{codes})))")
        self.db.execute("COMMIT")
        return cur.rowcount

    def pending_count(self) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM urls WHERE status IS NULL AND first_row IS NOT NULL").fetchone()[0]

    def iter_pending(self, page: int = 1000) -> Iterator[tuple[int, str]]:
        """Unfinished URLs in input order, a page at a time so memory stays flat."""
        last = -1
        while True:
            batch = self.db.execute(
                "SELECT id, url FROM urls WHERE id > ? AND status IS NULL AND first_row IS NOT NULL "
                "ORDER BY id LIMIT ?", (last, page)).fetchall()
            if not batch:
                return
            yield from batch
            last = batch[-1][0]

    def record(self, outcomes: Iterable[Outcome]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany(
            "UPDATE urls SET status = ?, error = ?, http_status = ?, attempts = attempts + ?, sha256 = ?, "
            "path = ?, width = ?, height = ?, bytes = ? WHERE id = ?",
            [(o.status, o.error, o.http_status, o.attempts, o.sha256, o.path, o.width, o.height, o.bytes,
              o.url_id) for o in outcomes])
        self.db.execute("COMMIT")

    def manifest_rows(self, batch: int = 20_000) -> Iterator[list[tuple]]:
        cur = self.db.execute(_MANIFEST_QUERY)
        while rows := cur.fetchmany(batch):
            yield rows

    def shared_images(self) -> Iterator[tuple]:
        """Stored images that appear under several splits (leakage) or several labels (conflict)."""
        yield from self.db.execute(_SHARED_IMAGES_QUERY)

    def is_referenced(self, rel_path: str) -> bool:
        sha = Path(rel_path).stem
        return self.db.execute("SELECT 1 FROM urls WHERE sha256 = ? AND path = ? LIMIT 1",
                               (sha, rel_path)).fetchone() is not None
