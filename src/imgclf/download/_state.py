"""Resume state: DATA_DIR/.state.sqlite (SQLite in WAL mode), the durable truth of a download.

Two tables (and `parts`, see _parts). `rows` is the input, one line per input row (re-read when the sources change).
`urls` holds one line per distinct URL with its outcome: `status` NULL means not finished.
A local file or archive member is a "URL" too: its locator (see imgclf.manifest) is the key,
`kind` says how to read it, and `size`/`stamp` are its signature when it was listed, so a
file that changed is validated again while an unchanged one is not. `skipped` lists the files
of local sources that get no row (hidden, outside class folders, ...), for the report.
A result is committed only after its image file is in place, so after a kill (even SIGKILL)
a URL is either finished, with its file, or fetched again; a finished URL is never fetched
again. The Ray driver commits a shard as one part (`commit_part`), applied to `urls` in bulk when
the state is opened and when statuses are read (`fold`). The manifest is a join of the two,
streamed in row order.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pandas as pd

from imgclf import sources
from imgclf.download import _parts
from imgclf.download._fetch import RETRY_STATUSES
from imgclf.download._items import iter_items
from imgclf.download._local import Item, LocalRef, Skipped
from imgclf.errors import ConfigError, DataError
from imgclf.net.http import check_url
from imgclf.untrusted import check_label, shown

STATE_NAME = ".state.sqlite"

_SHA_INDEX = "CREATE INDEX IF NOT EXISTS urls_by_sha ON urls(sha256) WHERE sha256 <> ''"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS urls(
    id INTEGER PRIMARY KEY, url TEXT NOT NULL UNIQUE, first_row INTEGER,
    status TEXT, error TEXT NOT NULL DEFAULT '', http_status INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, sha256 TEXT NOT NULL DEFAULT '', path TEXT NOT NULL DEFAULT '',
    width INTEGER NOT NULL DEFAULT 0, height INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0);
{_SHA_INDEX};
CREATE TABLE IF NOT EXISTS rows(row INTEGER PRIMARY KEY, source TEXT NOT NULL, url TEXT NOT NULL,
                                label TEXT NOT NULL, split TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS skipped(source TEXT NOT NULL, path TEXT NOT NULL, kind TEXT NOT NULL,
                                   reason TEXT NOT NULL);
""" + _parts.PARTS_SCHEMA + ";\n"
# Columns of local items, added to `urls` (also to a state written before local sources existed).
_LOCAL_COLUMNS = (("kind", "TEXT NOT NULL DEFAULT 'url'"), ("file", "TEXT NOT NULL DEFAULT ''"),
                  ("member", "TEXT NOT NULL DEFAULT ''"), ("pos", "INTEGER NOT NULL DEFAULT -1"),
                  ("size", "INTEGER NOT NULL DEFAULT -1"), ("stamp", "INTEGER NOT NULL DEFAULT -1"),
                  # --layout tar: the shard holding the stored image and its data's byte offset
                  ("shard", "TEXT NOT NULL DEFAULT ''"), ("shard_offset", "INTEGER NOT NULL DEFAULT -1"))

_UPSERT_URL = """
INSERT INTO urls(url, first_row, status, error) VALUES (?, ?, ?, ?)
ON CONFLICT(url) DO UPDATE SET first_row = excluded.first_row WHERE urls.first_row IS NULL
"""

# A local item keeps its outcome while its signature is unchanged; a changed file starts over.
_SAME_FILE = ("urls.kind = excluded.kind AND urls.file = excluded.file AND urls.size = excluded.size "
              "AND urls.stamp = excluded.stamp")
_UPSERT_LOCAL = f"""
INSERT INTO urls(url, first_row, status, error, kind, file, member, pos, size, stamp)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(url) DO UPDATE SET
    first_row = COALESCE(urls.first_row, excluded.first_row),
    status = CASE WHEN {_SAME_FILE} THEN urls.status ELSE excluded.status END,
    error = CASE WHEN {_SAME_FILE} THEN urls.error ELSE excluded.error END,
    kind = excluded.kind, file = excluded.file, member = excluded.member, pos = excluded.pos,
    size = excluded.size, stamp = excluded.stamp
"""

# Manifest rows in input order with what is needed to resolve duplicates: the first row that
# holds the same URL (urls.first_row) and the first row that holds the same stored content.
_MANIFEST_QUERY = """
WITH first_by_sha AS (
    SELECT sha256, MIN(first_row) AS first FROM urls
    WHERE status = 'ok' AND first_row IS NOT NULL GROUP BY sha256)
SELECT r.row, r.source, r.url, r.label, r.split, u.status, u.error, u.http_status, u.attempts,
       u.sha256, u.path, u.width, u.height, u.bytes, u.first_row, f.first, u.shard, u.shard_offset
FROM rows r LEFT JOIN urls u ON u.url = r.url AND (r.label <> '' OR ?)
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
    shard: str = ""  # --layout tar: the tar holding the image ("" for a plain file)
    offset: int = -1  # --layout tar: byte offset of the image's data in the shard
    data: bytes | None = field(default=None, repr=False, compare=False)  # tar: the image, until its shard is written


def _fingerprint(paths: list[Path], how: object) -> str:
    """The input as read: each source's identity and signature, and how it was read (columns, caps)."""
    items: list[object] = [repr(how)]
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
        self.keep_unlabelled = False  # set by ingest: --label-sep given
        self._lock = _lock_dir(data_dir)
        db: sqlite3.Connection | None = None
        try:
            # isolation_level=None: we open transactions ourselves, one per batch.
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process (not a power cut) without an fsync per commit.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            _add_local_columns(db)
            _parts.fold(db, _SHA_INDEX)  # what a killed run committed, before anything reads a status
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

    def ingest(self, paths: list[Path], chunk_rows: int, columns: sources.Columns | None = None,
               max_bytes: int = 20_000_000, keep: Callable[[str], bool] | None = None,
               follow_links: bool = False) -> int:
        """Load the input rows unless this exact input was already loaded; return the row count.

        Tables and archives are identified by their size and mtime; folders and tables naming
        local files are read again every run (a file may have been added or changed).
        `keep(url)` (--shard i/n): only those rows are loaded; they keep their input row numbers.
        """
        columns = columns or sources.Columns()
        # --label-sep (multi-label data): a row with an empty label cell is an image without labels,
        # fetched like any other; without it such a row ends missing_label and is never fetched.
        self.keep_unlabelled = columns.label_sep is not None
        fingerprint = _fingerprint(paths, (columns, max_bytes, keep, follow_links))
        if self._meta("ingested") == fingerprint:
            return self.db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
        self.db.execute("BEGIN")
        self.db.execute("DELETE FROM meta WHERE key = 'ingested'")
        self.db.execute("DELETE FROM rows")
        self.db.execute("DELETE FROM skipped")
        self.db.execute("UPDATE urls SET first_row = NULL")  # URLs that left the input are not fetched
        self.db.execute("COMMIT")
        total, rereads = 0, False
        for chunk in iter_items(paths, chunk_rows, columns, max_bytes, follow_links):
            if isinstance(chunk, pd.DataFrame):
                self._ingest_chunk(chunk, total, keep)
                total += len(chunk)
            else:
                total, files = self._ingest_items(chunk, total, keep)
                rereads = rereads or files
        if not rereads:
            self.db.execute("BEGIN")
            self._set_meta("ingested", fingerprint)
            self.db.execute("COMMIT")
        return total

    def _ingest_items(self, items: list[Item | Skipped], row: int,
                      keep: Callable[[str], bool] | None = None) -> tuple[int, bool]:
        """Store a chunk of items (URLs and local files) from row number `row`; return the next row
        number and whether it held local files (which must be listed again next run)."""
        rows, url_rows, local_rows, skipped, files = [], [], [], [], False
        for item in items:
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            if keep is not None and not keep(item.url):
                row += 1  # another job's row: its number stays taken
                continue
            # a class folder named with a control character: one line (the locator holds it too: repr)
            check_label(item.label, shown(item.url, 160))
            if item.kind == "url":
                problem = _url_problem(item.url)
                key = _url_key(item.url, problem)
                rows.append((row, item.source, key, item.label, item.split))
                if item.label or self.keep_unlabelled:
                    url_rows.append((key, row, "invalid_url" if problem else None, problem))
            else:
                rows.append((row, item.source, item.url, item.label, item.split))
                files = files or item.kind == "file"
                if item.label or self.keep_unlabelled:
                    local_rows.append((item.url, row, item.status, item.error, item.kind, item.file, item.member,
                                       item.offset, item.size, item.stamp))
            row += 1
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO rows(row, source, url, label, split) VALUES (?, ?, ?, ?, ?)", rows)
        self.db.executemany(_UPSERT_URL, url_rows)
        self.db.executemany(_UPSERT_LOCAL, local_rows)
        self.db.executemany("INSERT INTO skipped(source, path, kind, reason) VALUES (?, ?, ?, ?)", skipped)
        self.db.execute("COMMIT")
        return row, files

    def _ingest_chunk(self, chunk: pd.DataFrame, first: int, keep: Callable[[str], bool] | None = None) -> None:
        """A table chunk of URLs only (the fast path), numbered from row `first`."""
        chunk = chunk.assign(row=range(first, first + len(chunk)))
        if keep is not None:
            chunk = chunk[[keep(url) for url in chunk["url"].tolist()]]
        problems: dict[str, str] = {}
        url_rows, keys = [], []
        for row, url, label in zip(chunk["row"].tolist(), chunk["url"].tolist(), chunk["label"].tolist(),
                                   strict=True):
            if url not in problems:
                problems[url] = _url_problem(url)
            problem = problems[url]
            keys.append(_url_key(url, problem))
            if not label and not self.keep_unlabelled:
                continue  # status missing_label, set per row in the manifest; its URL is not fetched
            url_rows.append((keys[-1], row, "invalid_url" if problem else None, problem))
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO rows(row, source, url, label, split) VALUES (?, ?, ?, ?, ?)",
                            zip(chunk["row"].tolist(), chunk["source"].tolist(), keys, chunk["label"].tolist(),
                                chunk["split"].tolist(), strict=True))
        self.db.executemany(_UPSERT_URL, url_rows)
        self.db.execute("COMMIT")

    def reopen_retryable(self) -> int:
        """--retry-failed: make failures that may go differently next time pending again."""
        codes = ",".join(str(c) for c in sorted(RETRY_STATUSES))
        self.db.execute("BEGIN")
        cur = self.db.execute(
            "UPDATE urls SET status = NULL WHERE first_row IS NOT NULL AND (status IN ('timeout', "
            f"'connection_error', 'tls_error') OR (status = 'http_error' AND http_status IN (0,{codes})) "
            "OR (status = 'unreadable' AND kind = 'file'))")
        self.db.execute("COMMIT")
        return cur.rowcount

    def pending_count(self) -> int:
        self.fold()  # after the Ray engine, before the local one counts what is left
        return self.db.execute(
            "SELECT COUNT(*) FROM urls WHERE status IS NULL AND first_row IS NOT NULL").fetchone()[0]

    def iter_pending(self, page: int = 1000) -> Iterator[tuple[int, str]]:
        """Unfinished URLs (http/https only) in input order, a page at a time so memory stays flat."""
        last = -1
        while True:
            batch = self.db.execute(
                "SELECT id, url FROM urls WHERE id > ? AND status IS NULL AND first_row IS NOT NULL "
                "AND kind = 'url' ORDER BY id LIMIT ?", (last, page)).fetchall()
            if not batch:
                return
            yield from batch
            last = batch[-1][0]

    def iter_pending_local(self, page: int = 1000) -> Iterator[tuple[int, str, LocalRef]]:
        """Unfinished local files and seekable archive members (the workers read them), in order."""
        last = -1
        while True:
            batch = self.db.execute(
                # NOT INDEXED: rowid order stops after a page; urls_pending would sort every pending row
                "SELECT id, url, kind, file, member, pos, size FROM urls NOT INDEXED WHERE id > ? AND status IS NULL "
                "AND first_row IS NOT NULL AND kind IN ('file', 'zip', 'tar') ORDER BY id LIMIT ?",
                (last, page)).fetchall()
            if not batch:
                return
            for url_id, url, *ref in batch:
                yield url_id, url, LocalRef(*ref)
            last = batch[-1][0]

    def pending_streams(self) -> list[str]:
        """Compressed tars with unfinished members (read front to back by the parent)."""
        return [f for (f,) in self.db.execute(
            "SELECT DISTINCT file FROM urls WHERE kind = 'tarstream' AND status IS NULL "
            "AND first_row IS NOT NULL ORDER BY file")]

    def pending_members(self, archive: str) -> dict[int, tuple[int, str, str]]:
        """data offset -> (id, locator, member name) of the unfinished members of one compressed tar
        (by offset: two members may share a name)."""
        return {pos: (url_id, url, member) for url_id, url, member, pos in self.db.execute(
            "SELECT id, url, member, pos FROM urls WHERE kind = 'tarstream' AND file = ? AND status IS NULL "
            "AND first_row IS NOT NULL ORDER BY id", (archive,))}

    def record(self, outcomes: Iterable[Outcome]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany(
            "UPDATE urls SET status = ?, error = ?, http_status = ?, attempts = attempts + ?, sha256 = ?, "
            "path = ?, width = ?, height = ?, bytes = ?, shard = ?, shard_offset = ? WHERE id = ?",
            [(o.status, o.error, o.http_status, o.attempts, o.sha256, o.path, o.width, o.height, o.bytes,
              o.shard, o.offset, o.url_id) for o in outcomes])
        self.db.execute("COMMIT")

    def commit_part(self, part: _parts.Part) -> None:
        """A shard's outcomes, committed in one small transaction (the Ray driver's commit point)."""
        _parts.commit(self.db, part)

    def fold(self) -> int:
        """Apply the committed parts to `urls` (before reading statuses); return the rows applied."""
        return _parts.fold(self.db, _SHA_INDEX)

    def row_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]

    def manifest_rows(self, batch: int = 20_000) -> Iterator[list[tuple]]:
        self.fold()
        cur = self.db.execute(_MANIFEST_QUERY, (int(self.keep_unlabelled),))  # --label-sep: unlabelled rows too
        while rows := cur.fetchmany(batch):
            yield rows

    def shared_images(self) -> Iterator[tuple]:
        """Stored images that appear under several splits (leakage) or several labels (conflict)."""
        yield from self.db.execute(_SHARED_IMAGES_QUERY)

    def skipped_report(self, listed: int = 1000) -> dict[str, object]:
        """Files of local sources that got no row: counts by kind and the first `listed` of them."""
        counts = Counter(dict(self.db.execute("SELECT kind, COUNT(*) FROM skipped GROUP BY kind").fetchall()))
        files = [{"source": s, "path": p, "kind": k, "reason": r} for s, p, k, r in self.db.execute(
            "SELECT source, path, kind, reason FROM skipped ORDER BY rowid LIMIT ?", (listed,))]
        return {"total": sum(counts.values()), "by_kind": dict(sorted(counts.items())), "files": files}

    def shards(self) -> set[str]:
        """Tar shards holding committed images (--layout tar): any other tar is an orphan."""
        self.fold()
        return {s for (s,) in self.db.execute("SELECT DISTINCT shard FROM urls WHERE shard <> ''")}

    def is_referenced(self, rel_path: str) -> bool:  # (remove_orphans folds first, via shards())
        sha = Path(rel_path).stem
        return self.db.execute("SELECT 1 FROM urls WHERE sha256 = ? AND path = ? LIMIT 1",
                               (sha, rel_path)).fetchone() is not None


# A URL cell that is not an http(s) URL is keyed apart from local items: "photos/cat/1.jpg" in a
# url column must not join (borrow) the folder file whose locator is the same text. A valid URL
# never equals a locator (a locator has no "//"); the manifest shows the cell without the prefix.
INVALID_PREFIX = "\x00"


def _url_key(url: str, problem: str) -> str:
    return INVALID_PREFIX + url if problem else url


def _url_problem(url: str) -> str:
    """Why a URL cell is not fetched ("" when it is): cut for its size (sources), or not http(s)."""
    return sources.cut_problem(url, "URL", sources.MAX_URL_BYTES) or check_url(url)


def committed_urls(db: sqlite3.Connection) -> set[str]:
    """The URLs holding a committed outcome, folded or not; read-only, for a reader watching a running
    download (tests, benchmarks/ray_two_nodes.sh) through its own connection."""
    ids = sorted(_parts.committed_ids(db))
    urls = {u for (u,) in db.execute("SELECT url FROM urls WHERE status IS NOT NULL")}
    for start in range(0, len(ids), 10_000):
        chunk = ids[start:start + 10_000]
        urls.update(u for (u,) in db.execute(f"SELECT url FROM urls WHERE id IN ({','.join('?' * len(chunk))})",
                                              chunk))
    return urls


def _add_local_columns(db: sqlite3.Connection) -> None:
    """Bring `urls` to the current columns (a state from before local sources lacks them)."""
    present = {row[1] for row in db.execute("PRAGMA table_info(urls)")}
    for name, declaration in _LOCAL_COLUMNS:
        if name not in present:
            db.execute(f"ALTER TABLE urls ADD COLUMN {name} {declaration}")
    # Unfinished URLs by kind and id: paging them (iter_pending, in the event loop) must not scan
    # every finished row in between (issue 22: 20,000 finished rows of 50 KB URLs stalled the loop).
    db.execute("CREATE INDEX IF NOT EXISTS urls_pending ON urls(kind, id) WHERE status IS NULL")
