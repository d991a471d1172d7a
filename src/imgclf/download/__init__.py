"""The download stage: URL lists, image folders and archives in; validated images +
manifest.parquet + download_report.json out.

    imgclf download train.csv test.csv --out DATA_DIR          # run again to resume
    imgclf download photos/ more_photos.zip --out DATA_DIR     # local sources (see _local, _archive)

Flow: the sources are read in chunks into DATA_DIR/.state.sqlite (one line per input row, one
per distinct URL); every unfinished URL is fetched once by an asyncio/aiohttp pool (`_fetch`),
its body validated, resized and stored by content hash in worker processes (`_store`), and the
outcome committed. Local files and archive members are listed like rows (`_local`, `_archive`)
and handed to the same workers by reference (`_feed`): the worker reads the file itself and
validates it with the same `_store.process_body`. Finally the manifest (one row per input row,
see imgclf.manifest) and the report (counts per status and per split/label, duplicates,
train/test leakage, skipped local files) are written from the state (`_report`). Train,
evaluate and predict read only the manifest and images/.

    from imgclf import download
    result = download.run([Path("train.csv")], Path("data"), download.DownloadOptions(show_progress=False))
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf import sources as _sources
from imgclf.download._batch import Batcher
from imgclf.download._feed import feed, local_pages, stream_pages, worker_death
from imgclf.download._fetch import Fetcher
from imgclf.download._local import check_out_dir
from imgclf.download._merge import merge
from imgclf.download._options import DownloadOptions, StoreSettings
from imgclf.download._progress import Progress
from imgclf.download._report import print_summary, write_outputs
from imgclf.download._sink import Target, TarSink, next_shard_number
from imgclf.download._state import STATE_NAME, Outcome, State
from imgclf.download._store import IMAGES_DIR, TMP_DIR, Stored, die_with_parent
from imgclf.errors import DataError, ImgclfError
from imgclf.images import Rejected
from imgclf.manifest import MANIFEST_NAME, REPORT_NAME
from imgclf.net.http import check_url

__all__ = ["DownloadOptions", "DownloadResult", "run", "merge", "check_url", "STATE_NAME"]

_FLUSH_EVERY_S = 0.25
_FLUSH_ROWS = 512


@dataclass(frozen=True)
class DownloadResult:
    total: int  # input rows
    counts: dict[str, int]  # status -> rows
    manifest_path: Path
    report_path: Path
    report: dict[str, Any]
    fetched: int  # URLs finished by this run
    elapsed_s: float


def run(sources: list[Path], out_dir: Path | str, options: DownloadOptions | None = None) -> DownloadResult:
    """Download every row of `sources` into `out_dir` (a folder or an object-store URL, see _sink);
    resumes whatever an earlier run left."""
    options = options or DownloadOptions()
    paths = [Path(p) for p in sources]
    if not paths:
        raise DataError("download: give at least one source (a table, a folder or an archive)")
    for path in paths:
        _sources.source_kind(path)  # a one-line error for a missing or unsupported source
    target = Target.resolve(out_dir, options.state_dir)
    data_dir = target.work_dir  # the local --out itself, or the local state folder of a URL --out
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"{data_dir}: --out exists and is not a directory")
    if not target.remote:
        check_out_dir(paths, data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    state = State(data_dir)
    try:
        state.check_storage(options.storage_key(), data_dir)
        keep = job.filter() if (job := options.job()) else None  # --shard i/n: this job's rows only
        state.ingest(paths, options.chunk_rows, options.columns(), options.max_bytes, keep)
        if crowded := keep and keep.note():  # one host in one job: say so (docs/scale.md)
            logging.getLogger("imgclf.download").warning("%s", crowded)
        if options.retry_failed:
            state.reopen_retryable()
        crashed = state.begin_run()
        shutil.rmtree(data_dir / TMP_DIR, ignore_errors=True)  # partial files of a killed run
        fetched, ok, interrupted = 0, 0, False
        fetch_started = time.monotonic()
        try:
            fetched, ok = _fetch_all(state, options.store_settings(target.out), options, target)
        except KeyboardInterrupt as err:
            interrupted = True  # committed results stay; the manifest below marks the rest pending
            fetched, ok = getattr(err, "done", fetched), getattr(err, "ok", ok)  # the summary counts them
        fetch_s = time.monotonic() - fetch_started
        if not interrupted:
            if crashed:
                _remove_orphans(state, target)
            state.end_run()
        extra = {"fetched_this_run": fetched, "ok_this_run": ok, "fetch_s": round(fetch_s, 3),
                 "images_per_s": round(ok / fetch_s, 2) if fetched and fetch_s > 0 else 0.0,
                 "interrupted": interrupted, "options": options.storage_key(),
                 "skipped": state.skipped_report(), **({"job_note": crowded} if crowded else {})}
        manifest, report_path, report = write_outputs(state, data_dir, extra)
        target.publish(MANIFEST_NAME, REPORT_NAME)  # a URL --out: upload them (local: already there)
    finally:
        state.close()
    elapsed = time.monotonic() - started
    if options.print_summary:
        from rich.console import Console

        print_summary(report, Console())
    if interrupted:
        raise KeyboardInterrupt
    return DownloadResult(report["total_rows"], dict(report["counts"]), manifest, report_path, report,
                          fetched, elapsed)


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    # fork starts workers in milliseconds; they are started here, before the event loop and the
    # progress thread exist, so no lock held by another thread is copied into them.
    ctx = multiprocessing.get_context("fork") if sys.platform == "linux" else None
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                  initializer=die_with_parent, initargs=(os.getpid(),))
    pool.submit(int).result()
    return pool


def _fetch_all(state: State, settings: StoreSettings, options: DownloadOptions, target: Target) -> tuple[int, int]:
    """--engine ray: the URLs go to Ray workers first (see _engine_ray); the rest (local files) is read here."""
    fetched = ok = 0
    if options.engine == "ray":
        from imgclf.download import _engine_ray

        fetched, ok = _engine_ray.fetch_pending(state, settings, options, target)
    more, more_ok = _fetch_pending(state, settings, options, target)
    return fetched + more, ok + more_ok


def _fetch_pending(state: State, settings: StoreSettings, options: DownloadOptions,
                   target: Target) -> tuple[int, int]:
    """Fetch every unfinished URL; return (URLs finished, of which ok)."""
    pending = state.pending_count()
    if pending == 0:
        return 0, 0
    pool = _pool(options.workers)
    progress = Progress(pending, options.show_progress)
    try:
        with progress:
            return asyncio.run(_download(state, settings, options, pool, progress, target))
    except KeyboardInterrupt:
        raise _Interrupted(progress.ok + progress.failed, progress.ok) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C during the fetch, carrying what this run finished (and committed) before it."""

    def __init__(self, done: int, ok: int) -> None:
        super().__init__()
        self.done, self.ok = done, ok


class _Recorder:
    """Buffers outcomes and commits them in small transactions (one fsync-free commit per batch)."""

    def __init__(self, state: State) -> None:
        self.state, self.buffer, self.done, self.ok = state, [], 0, 0
        self.last = time.monotonic()
        self.sink: TarSink | None = None  # --layout tar: ok rows are committed with their shard

    def add(self, outcome: Outcome) -> None:
        if outcome.data is not None and self.sink is not None:
            self.sink.add(outcome)
            return
        self.buffer.append(outcome)
        if len(self.buffer) >= _FLUSH_ROWS or time.monotonic() - self.last >= _FLUSH_EVERY_S:
            self.flush()

    def commit(self, outcomes: list[Outcome]) -> None:
        """A published shard's rows, in one transaction."""
        self.flush()
        self.buffer = outcomes
        self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.state.record(self.buffer)
            self.done += len(self.buffer)
            self.ok += sum(o.status == "ok" for o in self.buffer)
            self.buffer = []
        self.last = time.monotonic()


async def _download(state: State, settings: StoreSettings, options: DownloadOptions,
                    pool: concurrent.futures.ProcessPoolExecutor, progress: Progress,
                    target: Target) -> tuple[int, int]:
    fetcher = Fetcher(options)
    recorder = _Recorder(state)
    if settings.layout == "tar":
        recorder.sink = TarSink(target, next_shard_number(state.shards()), options.shard_size, recorder.commit)
    batcher = Batcher(pool, settings)
    # Bounded: the input is paged from SQLite only as fast as slots free up.
    queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue(maxsize=options.concurrency * 2)

    async def one(url_id: int, url: str) -> Outcome:
        got = await fetcher.fetch(url)
        if got.status is not None:
            return Outcome(url_id, got.status, got.error, got.http_status, got.attempts)
        body, got.body = got.body, None
        with worker_death():
            result = await batcher.process(body)
        return _outcome(url_id, result, got.http_status, got.attempts)

    async def worker() -> None:
        while (item := await queue.get()) is not None:
            outcome = await one(*item)
            recorder.add(outcome)
            progress.advance(outcome.status)

    def deliver(url_id: int, result: Stored | Rejected) -> None:  # a local item: no HTTP
        outcome = _outcome(url_id, result, 0, 0)
        recorder.add(outcome)
        progress.advance(outcome.status)

    async def local() -> None:  # files and archive members, alongside the URLs
        await feed(pool, settings, options.workers, local_pages(state.iter_pending_local()), deliver)
        for archive in state.pending_streams():
            await feed(pool, settings, options.workers,
                       stream_pages(archive, state.pending_members(archive), settings.max_bytes), deliver)

    async def ticker() -> None:
        while True:  # commits results even when they arrive slowly, and refreshes the rate
            await asyncio.sleep(_FLUSH_EVERY_S)
            recorder.flush()
            progress.tick()

    async def produce() -> None:
        for item in state.iter_pending():
            await queue.put(item)
        for _ in range(n_workers):
            await queue.put(None)

    n_workers = max(1, min(options.concurrency, progress.total))
    tick = asyncio.create_task(ticker())
    try:
        async with asyncio.TaskGroup() as group:  # one failing task (a fatal error) cancels the rest
            group.create_task(produce())
            group.create_task(local())
            for _ in range(n_workers):
                group.create_task(worker())
    except BaseExceptionGroup as failed:
        raise _first_error(failed) from None
    finally:
        tick.cancel()
        await asyncio.gather(tick, return_exceptions=True)
        if recorder.sink is not None:
            await recorder.sink.aclose()
        recorder.flush()
        await fetcher.close()
    return recorder.done, recorder.ok


def _outcome(url_id: int, result: Stored | Rejected, http_status: int, attempts: int) -> Outcome:
    if isinstance(result, Rejected):
        if result.status == "storage_error":  # disk full, permissions: stop, nothing is lost
            raise DataError(result.reason)
        return Outcome(url_id, result.status, result.reason, http_status, attempts)
    return Outcome(url_id, "ok", "", http_status, attempts, result.sha256, result.path, result.width,
                   result.height, result.bytes, data=result.data)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to show: a user-facing one when there is one, else the first."""
    leaves = []
    stack: list[BaseException] = [group]
    while stack:
        err = stack.pop()
        if isinstance(err, BaseExceptionGroup):
            stack.extend(reversed(err.exceptions))
        else:
            leaves.append(err)
    return next((e for e in leaves if isinstance(e, ImgclfError)), leaves[0])


def _remove_orphans(state: State, target: Target) -> None:
    """After a killed run: drop stored files and shards whose result was never committed (they are
    refetched). Not for image files on object storage: listing every object costs more than an
    unreferenced object (content-addressed: a refetch rewrites the same name)."""
    target.remove_orphan_shards(state.shards())
    if target.remote:
        return
    data_dir = target.work_dir
    images = data_dir / IMAGES_DIR
    if not images.is_dir():
        return
    for path in images.glob("*/*"):
        if path.is_file() and not state.is_referenced(path.relative_to(data_dir).as_posix()):
            path.unlink(missing_ok=True)


# `imgclf.download(...)` calls imgclf.api.download (see imgclf._stage).
from imgclf._stage import callable_stage  # noqa: E402

callable_stage(__name__)
