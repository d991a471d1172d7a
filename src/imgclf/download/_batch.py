"""Hands bodies to the worker processes in small batches instead of one task per image.

Each process-pool task costs a pipe write, a wake-up and a result message in the parent; for
small images that overhead rivals the decoding itself. Bodies arriving within a few
milliseconds share one task (bounded in count and bytes); each caller still awaits its own result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from imgclf.download._options import StoreSettings
from imgclf.download._pool import Pool
from imgclf.download._store import Stored, process_many
from imgclf.images import Rejected

MAX_ITEMS = 16
MAX_BYTES = 4_000_000
MAX_WAIT_S = 0.004


class Batcher:
    def __init__(self, pool: Pool, settings: StoreSettings) -> None:
        self.pool, self.settings = pool, settings
        self._bodies: list[bytes] = []
        self._waiters: list[asyncio.Future[Stored | Rejected]] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    async def process(self, body: bytes) -> Stored | Rejected:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Stored | Rejected] = loop.create_future()
        self._bodies.append(body)
        self._waiters.append(waiter)
        self._size += len(body)
        if len(self._bodies) >= MAX_ITEMS or self._size >= MAX_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(MAX_WAIT_S, self.flush)
        return await waiter

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        bodies, waiters = self._bodies, self._waiters
        self._bodies, self._waiters, self._size = [], [], 0
        if not bodies:
            return
        try:
            done = asyncio.wrap_future(self.pool.submit(process_many, bodies, self.settings))
        except (RuntimeError, concurrent.futures.process.BrokenProcessPool) as err:
            _fail(waiters, err)
            return
        done.add_done_callback(lambda fut: _deliver(fut, waiters))


def _deliver(fut: asyncio.Future[list[Stored | Rejected]],
             waiters: list[asyncio.Future[Stored | Rejected]]) -> None:
    if fut.cancelled():
        _fail(waiters, asyncio.CancelledError())
        return
    if (err := fut.exception()) is not None:
        _fail(waiters, err)
        return
    for waiter, result in zip(waiters, fut.result(), strict=True):
        if not waiter.done():
            waiter.set_result(result)


def _fail(waiters: list[asyncio.Future[Stored | Rejected]], err: BaseException) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(err)
