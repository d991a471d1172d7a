"""The local download's worker processes, driven by the event loop itself: no helper thread.

`concurrent.futures.ProcessPoolExecutor` keeps a manager thread in the parent that wakes for every
result and then wants the GIL the fetch loop holds: one more thread taking turns with the loop, for
each batch of bodies. Here each worker is a forked process with two pipes. The loop writes tasks
without blocking (`add_writer` when a pipe is full) and reads results with `add_reader`;
`submit(fn, *args)` returns an asyncio future. Measured on 20,000 small PNGs from a loopback server
(docs/benchmarks.md, issue 23 item 5), with uvloop: 15-20% less CPU in the parent.

A worker that dies (the OOM killer) closes its result pipe: its tasks and every later `submit` fail
with `BrokenProcessPool`, as with the executor (see `_feed.worker_death`). Linux only (fork and
inherited pipe ends); elsewhere the engine keeps the executor (`_engine_local._pool`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import multiprocessing
import os
import pickle
import struct
import traceback
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from imgclf._files import write_all

_HEADER = struct.Struct("!Q")  # frame length, then a pickle
_READ = 1 << 16


class LoopPool:
    """`workers` forked processes (started here, before any loop or thread exists), each running
    `initializer(*initargs)` and then tasks in order; `submit` must be called inside the loop."""

    def __init__(self, workers: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple[Any, ...] = ()) -> None:
        self._workers: list[_Worker] = []
        self._broken: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_id = 0
        for _ in range(workers):
            self._workers.append(_Worker.start(initializer, initargs, self._workers))

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        if self._broken is not None:
            raise BrokenProcessPool(self._broken)
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # the first submit on this loop: listen for every worker's results
            self._loop = loop
            for worker in self._workers:
                loop.add_reader(worker.results, self._readable, worker)
        worker = min(self._workers, key=lambda w: len(w.pending))  # the least busy
        self._next_id += 1
        future: asyncio.Future[Any] = loop.create_future()
        worker.pending[self._next_id] = future
        frame = pickle.dumps((self._next_id, fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        worker.outbox += _HEADER.pack(len(frame)) + frame
        self._flush(worker)
        return future

    def _flush(self, worker: _Worker) -> None:
        assert self._loop is not None
        try:
            while worker.outbox:
                del worker.outbox[:os.write(worker.tasks, worker.outbox)]
        except BlockingIOError:
            pass
        except OSError as err:  # EPIPE: the worker is gone; its result pipe says so too
            self._lose(worker, f"cannot send to an image worker ({os.strerror(err.errno or errno.EPIPE)})")
            return
        if worker.outbox and not worker.writing:
            self._loop.add_writer(worker.tasks, self._flush, worker)
            worker.writing = True
        elif not worker.outbox and worker.writing:
            self._loop.remove_writer(worker.tasks)
            worker.writing = False

    def _readable(self, worker: _Worker) -> None:
        try:
            while chunk := os.read(worker.results, _READ):
                worker.inbox += chunk
        except BlockingIOError:
            chunk = b"-"
        for task_id, ok, value in worker.frames():
            future = worker.pending.pop(task_id, None)
            if future is None or future.done():  # failed already (another worker died)
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        if not chunk:  # end of file: the worker exited or was killed
            self._lose(worker, "an image worker process died")

    def _lose(self, worker: _Worker, why: str) -> None:
        self._broken = why
        for other in self._workers:
            self._fail(other, why)
        self._forget(worker)

    def _fail(self, worker: _Worker, why: str) -> None:
        pending, worker.pending = worker.pending, {}
        for future in pending.values():
            # After Ctrl-C the loop may be closed already: nobody waits for those futures any more.
            if not future.done() and not future.get_loop().is_closed():
                future.set_exception(BrokenProcessPool(why))

    def _forget(self, worker: _Worker) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(worker.results)
            if worker.writing:
                self._loop.remove_writer(worker.tasks)
        worker.writing = False

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Close the task pipes (each worker ends after its current task) and reap the workers."""
        for worker in self._workers:
            if cancel_futures:
                self._fail(worker, "the pool was shut down")
            self._forget(worker)
            worker.close()
        for worker in self._workers:
            worker.process.join(timeout=10 if wait else 0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        self._workers = []


class _Worker:
    """The parent's side of one worker: its process, its two pipe ends, its buffers and open tasks."""

    def __init__(self, process: multiprocessing.process.BaseProcess, tasks: int, results: int) -> None:
        self.process, self.tasks, self.results = process, tasks, results
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.outbox, self.inbox = bytearray(), bytearray()
        self.writing = False

    @classmethod
    def start(cls, initializer: Callable[..., None] | None, initargs: tuple[Any, ...],
              siblings: list[_Worker]) -> _Worker:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        # The child closes the parent's ends, its siblings' included, so that each result pipe has
        # one writer: its worker's death is an end of file here.
        theirs = [task_w, result_r] + [fd for w in siblings for fd in (w.tasks, w.results)]
        process = multiprocessing.get_context("fork").Process(
            target=_serve, args=(task_r, result_w, theirs, initializer, initargs), daemon=True)
        process.start()
        os.close(task_r)
        os.close(result_w)
        os.set_blocking(task_w, False)
        os.set_blocking(result_r, False)
        return cls(process, task_w, result_r)

    def frames(self) -> list[tuple[int, bool, Any]]:
        """Whole result frames received so far (a frame may arrive in several reads)."""
        done, view = [], self.inbox
        start = 0
        while len(view) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(view, start)
            end = start + _HEADER.size + size
            if len(view) < end:
                break
            done.append(pickle.loads(view[start + _HEADER.size:end]))
            start = end
        del self.inbox[:start]
        return done

    def close(self) -> None:
        for fd in (self.tasks, self.results):
            with contextlib.suppress(OSError):
                os.close(fd)


def _serve(tasks: int, results: int, theirs: list[int], initializer: Callable[..., None] | None,
           initargs: tuple[Any, ...]) -> None:
    """A worker's life: tasks in order until the task pipe closes; each answered with (id, ok, value)."""
    for fd in theirs:
        with contextlib.suppress(OSError):
            os.close(fd)
    if initializer is not None:
        initializer(*initargs)
    while (header := _read_exactly(tasks, _HEADER.size)) is not None:
        frame = _read_exactly(tasks, _HEADER.unpack(header)[0])
        if frame is None:
            break
        task_id, fn, args = pickle.loads(frame)
        try:
            answer = (task_id, True, fn(*args))
        except BaseException as err:  # noqa: BLE001 - goes back to the caller's future
            answer = (task_id, False, _portable(err))
        out = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        write_all(results, _HEADER.pack(len(out)) + out)


def _portable(err: BaseException) -> BaseException:
    """The error itself when it pickles, else a RuntimeError carrying its text and traceback."""
    try:
        pickle.dumps(err)
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError("".join(traceback.format_exception(err)))


def _read_exactly(fd: int, size: int) -> bytes | None:
    parts, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


# What the Batcher and the local feed submit to: this pool, or an executor (a Ray worker's).
Pool = LoopPool | concurrent.futures.Executor
