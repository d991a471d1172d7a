"""Feeds local items to the download's worker pool, with no per-item round trip through asyncio.

Local files and zip/plain-tar members travel as `LocalRef`s (a path and an offset: the worker
reads the bytes itself, nothing large crosses the pool's pipe), BATCH of them per pool task,
at most two tasks per worker in flight. Members of a compressed tar are read front to back in
a thread (one decompressor per archive) and travel as bytes. Every result goes through the
same `_store.process_many` as downloaded bodies and is handed to `deliver` as it arrives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from itertools import islice

from imgclf.download._local import LocalRef
from imgclf.download._options import StoreSettings
from imgclf.download._pool import Pool
from imgclf.download._read import stream_members
from imgclf.download._store import Stored, process_many
from imgclf.errors import ImgclfError
from imgclf.images import Rejected

BATCH = 64
BATCH_BYTES = 4_000_000  # bytes items (compressed-tar members) per task, at most

Payload = LocalRef | bytes | Rejected
Deliver = Callable[[int, Stored | Rejected], None]


async def feed(pool: Pool, settings: StoreSettings, workers: int,
               pages: AsyncIterator[list[tuple[int, Payload]]], deliver: Deliver) -> None:
    """Process every (id, payload) of `pages` in the pool; a payload that is already a verdict
    (Rejected) is delivered as is."""
    slots = asyncio.Semaphore(2 * workers)

    async def run(batch: list[tuple[int, LocalRef | bytes]]) -> None:
        try:
            with worker_death():
                results = await asyncio.wrap_future(pool.submit(process_many, [p for _, p in batch], settings))
        finally:
            slots.release()
        for (url_id, _), result in zip(batch, results, strict=True):
            deliver(url_id, result)

    async with asyncio.TaskGroup() as group:
        batch: list[tuple[int, LocalRef | bytes]] = []
        size = 0
        async for page in pages:
            for url_id, payload in page:
                if isinstance(payload, Rejected):
                    deliver(url_id, payload)
                    continue
                batch.append((url_id, payload))
                size += len(payload) if isinstance(payload, bytes) else 0
                if len(batch) >= BATCH or size >= BATCH_BYTES:
                    await slots.acquire()
                    group.create_task(run(batch))
                    batch, size = [], 0
        if batch:
            await slots.acquire()
            group.create_task(run(batch))


@contextlib.contextmanager
def worker_death() -> Iterator[None]:
    """A worker killed under us (the OOM killer) is one line for the user, not a traceback."""
    try:
        yield
    except concurrent.futures.process.BrokenProcessPool:
        raise ImgclfError("an image worker process died (out of memory?); run the same command "
                          "again to resume") from None


async def local_pages(items: Iterator[tuple[int, str, LocalRef]]) -> AsyncIterator[list[tuple[int, Payload]]]:
    """Pending local refs from the state, a page at a time (SQLite paging is quick: done inline)."""
    while page := [(url_id, ref) for url_id, _, ref in islice(items, BATCH)]:
        yield page


async def stream_pages(archive: str, wanted: dict[int, tuple[int, str, str]],
                       max_bytes: int) -> AsyncIterator[list[tuple[int, Payload]]]:
    """The wanted members of one compressed tar, decompressed in a thread so the loop stays free."""
    members = stream_members(archive, wanted, max_bytes)

    def take() -> list[tuple[int, Payload]]:
        return [(url_id, data) for url_id, _, data in islice(members, BATCH)]

    try:
        while page := await asyncio.to_thread(take):
            yield page
    finally:
        try:
            members.close()  # closes the archive
        except ValueError:  # cancelled while the thread still reads: it ends with the process
            pass
