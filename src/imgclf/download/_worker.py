"""A Ray worker's download loop: shards of (url id, url) in, one Outcome per URL out.

The same pieces as the single-machine download: `Fetcher` (retries, redirects, capped bodies,
timeouts), `Batcher` + `_store.process_many` in a process pool (decode, validate, resize, store:
the one "process and store a body" step) and the same Outcome per URL. Only the feeding
differs: `run(items)` queues a shard's URLs behind those of the shards already running, and
`concurrency` consumers take them in order, so a shard's slow last URLs overlap the next shard's
first ones instead of idling the worker. A shard's outcomes come back together, when its last URL
is done (the driver commits them in one transaction); an error that stops the single-machine run
(storage_error: disk full) fails the shard instead, and the driver retries it.

--layout tar: the shard's images go into one tar (`_writers.TarShardWriter`, named by the driver,
a new name per attempt), published before the outcomes, with their final offsets, go back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import tempfile
from dataclasses import dataclass, field, replace

from imgclf.download._batch import Batcher
from imgclf.download._fetch import Fetcher
from imgclf.download._options import DownloadOptions, StoreSettings
from imgclf.download._politeness import HostLimiter
from imgclf.download._state import Outcome
from imgclf.download._writers import TarShardWriter


@dataclass
class _Job:
    """One shard in the worker: its outcomes so far and the future its caller awaits."""

    size: int
    done: asyncio.Future[list[Outcome]]
    tar: TarShardWriter | None = None  # --layout tar
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        if outcome.data is not None and self.tar is not None:
            location = self.tar.write(outcome.sha256, outcome.path.rsplit(".", 1)[-1], outcome.data)
            outcome = replace(outcome, path=location.path, shard=location.shard, data=None)
        self.outcomes.append(outcome)
        if len(self.outcomes) == self.size and not self.done.done():
            self.done.set_result(self.outcomes)

    def fail(self, err: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(err)


class ShardRunner:
    """Downloads shards with one aiohttp session and one process pool for the worker's lifetime."""

    def __init__(self, options: DownloadOptions, settings: StoreSettings, limiter: HostLimiter,
                 pool: concurrent.futures.Executor) -> None:
        self.options, self.settings, self.limiter, self.pool = options, settings, limiter, pool
        self._queue: asyncio.Queue[tuple[_Job, int, str]] | None = None
        self._consumers: list[asyncio.Task[None]] = []
        self._spool_dir: tempfile.TemporaryDirectory[str] | None = None

    async def run(self, items: list[tuple[int, str]], tar_name: str | None = None) -> list[Outcome]:
        """The outcomes of one shard's URLs; with `tar_name` (--layout tar) its images in that tar."""
        if not items:
            return []
        if self._queue is None:
            self._start()
        assert self._queue is not None
        job = _Job(len(items), asyncio.get_running_loop().create_future())
        if tar_name is not None:
            job.tar = TarShardWriter(self.settings.data_dir, tar_name, self._work_dir())
        try:
            for url_id, url in items:
                self._queue.put_nowait((job, url_id, url))
            outcomes = await job.done
            if job.tar is None:
                return outcomes
            final = await asyncio.to_thread(job.tar.close)  # write and publish the tar, off the loop
            return [replace(o, offset=final[o.path].offset) if o.shard else o for o in outcomes]
        finally:
            if job.tar is not None:
                job.tar.abort()

    def _work_dir(self) -> str:
        if self._spool_dir is None:
            self._spool_dir = tempfile.TemporaryDirectory(prefix="imgclf-shard-")  # spools of URL outs
        return self._spool_dir.name

    def _start(self) -> None:
        self.fetcher = Fetcher(self.options, self.limiter)
        self.batcher = Batcher(self.pool, self.settings)
        self._queue = asyncio.Queue()
        self._consumers = [asyncio.create_task(self._consume()) for _ in range(self.options.concurrency)]

    async def _consume(self) -> None:
        assert self._queue is not None
        while True:
            job, url_id, url = await self._queue.get()
            if job.done.done():
                continue  # its shard already failed
            try:
                job.add(await self._one(url_id, url))
            except Exception as err:  # noqa: BLE001 - fails this shard; the driver retries it
                job.fail(err)

    async def _one(self, url_id: int, url: str) -> Outcome:
        from imgclf.download._commit import outcome  # the single-machine rule, incl. storage_error -> DataError

        got = await self.fetcher.fetch(url)
        if got.status is not None:
            return Outcome(url_id, got.status, got.error, got.http_status, got.attempts)
        body, got.body = got.body, None
        result = await self.batcher.process(body)
        return outcome(url_id, result, got.http_status, got.attempts)

    async def close(self) -> None:
        for task in self._consumers:
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        if self._queue is not None:
            await self.fetcher.close()
