"""The local engine: every unfinished URL fetched by an asyncio/aiohttp pool in this process, bodies
validated and stored by a pool of worker processes, local files and archive members read alongside.

Same signature as the Ray engine (`_engine_ray.fetch_pending`): (state, settings, options, target) ->
(rows finished, of which ok); Ctrl-C raises `Interrupted`, carrying what was committed before it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import time

from imgclf import net
from imgclf.download._batch import Batcher
from imgclf.download._commit import outcome as outcome_of
from imgclf.download._feed import feed, local_pages, stream_pages, worker_death
from imgclf.download._fetch import Fetcher
from imgclf.download._options import DownloadOptions, StoreSettings
from imgclf.download._pool import LoopPool, Pool
from imgclf.download._progress import Progress
from imgclf.download._sink import Target, TarSink, next_shard_number
from imgclf.download._state import Outcome, State
from imgclf.download._store import Stored, die_with_parent
from imgclf.errors import ImgclfError
from imgclf.images import Rejected

_FLUSH_EVERY_S = 0.25
_FLUSH_ROWS = 512


def fetch_pending(state: State, settings: StoreSettings, options: DownloadOptions,
                   target: Target) -> tuple[int, int]:
    """Fetch every unfinished URL; return (URLs finished, of which ok)."""
    pending = state.pending_count()
    if pending == 0:
        return 0, 0
    pool = _pool(options.workers)
    progress = Progress(pending, options.show_progress)
    try:
        with progress:
            return net.run(_download(state, settings, options, pool, progress, target))
    except KeyboardInterrupt:
        raise Interrupted(progress.ok + progress.failed, progress.ok) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Interrupted(KeyboardInterrupt):
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


def _pool(workers: int) -> Pool:
    # fork starts workers in milliseconds; they are started here, before the event loop and the
    # progress thread exist, so no lock held by another thread is copied into them.
    if sys.platform == "linux":
        return LoopPool(workers, initializer=die_with_parent, initargs=(os.getpid(),))
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent,
                                                  initargs=(os.getpid(),))  # macOS: spawn, not fork
    pool.submit(int).result()
    return pool


async def _download(state: State, settings: StoreSettings, options: DownloadOptions,
                    pool: Pool, progress: Progress,
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
        return outcome_of(url_id, result, got.http_status, got.attempts)

    async def worker() -> None:
        while (item := await queue.get()) is not None:
            outcome = await one(*item)
            recorder.add(outcome)
            progress.advance(outcome.status)

    def deliver(url_id: int, result: Stored | Rejected) -> None:  # a local item: no HTTP
        outcome = outcome_of(url_id, result, 0, 0)
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
