"""The download's loop-driven worker pool (`download._pool.LoopPool`): real forked processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from imgclf.download._pool import LoopPool


def _echo(data: bytes) -> bytes:
    return data[::-1]


def _pid() -> int:
    return os.getpid()


def _fail(text: str) -> None:
    raise ValueError(text)


class _Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("x")
        self.handle = lambda: None  # a lambda does not pickle


def _fail_oddly() -> None:
    raise _Unpicklable()


def _sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_results_errors_and_large_payloads_come_back() -> None:
    pool = LoopPool(2)
    big = os.urandom(9_000_000)  # far over a pipe's 64 KiB: both directions need several writes/reads

    async def main() -> None:
        small = [pool.submit(_echo, bytes([i]) * i) for i in range(1, 40)]
        large = pool.submit(_echo, big)
        assert [await f for f in small] == [bytes([i]) * i for i in range(1, 40)]
        assert await large == big[::-1]
        with pytest.raises(ValueError, match="bad row"):
            await pool.submit(_fail, "bad row")
        with pytest.raises(RuntimeError, match="_Unpicklable"):  # still an error, with its traceback's text
            await pool.submit(_fail_oddly)
        pids = {await pool.submit(_pid) for _ in range(8)}
        assert os.getpid() not in pids and 1 <= len(pids) <= 2

    try:
        asyncio.run(main())
    finally:
        pool.shutdown()


def test_tasks_spread_over_the_workers() -> None:
    pool = LoopPool(2)

    async def main() -> set[int]:
        return set(await asyncio.gather(*(pool.submit(_sleep, 0.2) for _ in range(4))))

    try:
        assert len(asyncio.run(main())) == 2  # the least busy worker gets each task
    finally:
        pool.shutdown()


def test_a_killed_worker_fails_its_tasks_and_every_later_submit() -> None:
    pool = LoopPool(2)

    async def main() -> None:
        first = await pool.submit(_pid)
        hanging = pool.submit(_sleep, 60)
        await asyncio.sleep(0.2)
        victims = [w.process.pid for w in pool._workers if w.pending]
        assert victims and first in {w.process.pid for w in pool._workers}
        os.kill(victims[0], signal.SIGKILL)
        with pytest.raises(BrokenProcessPool, match="died"):
            await asyncio.wait_for(hanging, 10)
        with pytest.raises(BrokenProcessPool):
            pool.submit(_pid)

    started = time.monotonic()
    try:
        asyncio.run(main())
    finally:
        pool.shutdown()
    assert time.monotonic() - started < 30  # nothing waited for the 60 s task


def test_shutdown_reaps_every_worker() -> None:
    pool = LoopPool(3)
    processes = [w.process for w in pool._workers]

    async def main() -> None:
        await asyncio.gather(*(pool.submit(_pid) for _ in range(6)))

    asyncio.run(main())
    pool.shutdown()
    assert all(not p.is_alive() and p.exitcode == 0 for p in processes)


def test_shutdown_after_the_loop_closed_with_a_task_still_running() -> None:
    """Ctrl-C: asyncio.run ends with a task still in a worker; shutdown must not touch the closed loop."""
    pool = LoopPool(1)

    async def main() -> None:
        pool.submit(_sleep, 0.5).add_done_callback(lambda _: None)  # a waiter, as the Batcher adds

    asyncio.run(main())
    pool.shutdown(cancel_futures=True)  # raised "Event loop is closed" before
    assert not pool._workers


def test_net_run_takes_uvloop_when_installed_and_asyncio_without(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from imgclf import net

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert net.run(loop_module()).startswith("uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as on Windows, where uvloop does not install
    assert net.run(loop_module()).startswith("asyncio")
