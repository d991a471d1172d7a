"""`imgclf download ... --engine ray`: the URLs fetched by Ray workers, committed by this process.

    imgclf download urls.csv --out DATA_DIR --engine ray --workers 4          # private local Ray
    imgclf download urls.csv --out DATA_DIR --engine ray --address HOST:6379  # an existing cluster

Flow: the driver (this process) keeps DATA_DIR/.state.sqlite exactly as the single-machine run
does and is its only writer. Pending URLs are cut into shards by URL id (`_shards`); each shard
goes to a worker actor (`_Worker`: one event loop, one aiohttp session, one process pool for its
lifetime, running `_worker.ShardRunner`, i.e. the single-machine fetch/validate/store code). At
most `OPEN_PER_WORKER` shards per worker are in flight: the next one is sent when one comes back,
never the whole list at once. A shard's outcomes come back together, encoded by the worker as one
Parquet part (`_parts.Part`), and the driver commits the part as one row in one small transaction:
that is the commit point, O(1) per shard for the driver (the per-row work is the workers').
A worker killed mid-shard (its node lost, OOM) costs its
open shards' uncommitted rows, nothing committed; those shards go back to the queue and the
live workers take them. Ray restarts the lost worker when it can place it; the run does not wait
for that (a lost node's worker may have nowhere to go), except when no worker is left at all
(`RESTART_WAIT_S`, then one line and a non-zero exit). A shard that fails `--shard-retries` + 1
times is left pending; the command then ends non-zero naming it (every other shard committed;
the same command again retries it). The driver killed (even SIGKILL): the same command resumes
from the state, like the laptop path.

Politeness holds across workers: one `_Leases` actor owns each host's adaptive limit
(`_politeness.LeaseBook`) and leases each worker a slice; workers sync every 0.2 s, not per request.
Workers write images into DATA_DIR themselves: on a cluster it must be a path every node sees
(a shared file system).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
import uuid
from collections import Counter, deque
from pathlib import Path
from typing import Any

from imgclf._ray import connect, import_ray
from imgclf.download._leases import SYNC_S, LeaseBook, LeasedLimiter
from imgclf.download._options import DownloadOptions, StoreSettings
from imgclf.download._parts import Part
from imgclf.download._progress import Progress
from imgclf.download._shards import Shard, iter_shards
from imgclf.download._sink import Target, next_shard_number
from imgclf.download._state import State
from imgclf.download._store import TMP_DIR, die_with_parent
from imgclf.download._worker import ShardRunner
from imgclf.download._writers import shard_name
from imgclf.errors import ImgclfError, first_line

ray = import_ray()

OPEN_PER_WORKER = 3
_WAIT_S = 0.25
# With every worker lost, how long to wait for one to be restarted (a killed process: seconds;
# a lost node with no free CPUs elsewhere: never) before giving up with one line.
RESTART_WAIT_S = float(os.environ.get("IMGCLF_RAY_RESTART_WAIT_S", "120"))
log = logging.getLogger("imgclf.download")


@ray.remote(num_cpus=0)
class _Leases:
    """The cluster's per-host limits (see _politeness.LeaseBook); a few calls per second per worker."""

    def __init__(self, ceiling: int, fixed: int | None) -> None:
        self.book = LeaseBook(ceiling, fixed)

    def sync(self, worker: str, report: dict) -> dict[str, int]:
        return self.book.sync(worker, report)


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=OPEN_PER_WORKER + 2)
class _Worker:
    """One download worker: shards in (several at once, fed in order), outcomes out."""

    def __init__(self, options: DownloadOptions, settings: StoreSettings, leases: str) -> None:
        self.name = uuid.uuid4().hex  # a restarted actor is a new lease holder
        # By name, not by handle: a handle argument would make restarts depend on the object store.
        self.leases = ray.get_actor(leases)
        # spawn, not fork: a Ray worker already runs threads (gRPC) when the pool starts.
        self.pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=options.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=die_with_parent, initargs=(os.getpid(),))
        self.pool.submit(int).result()
        self.limiter = LeasedLimiter()
        self.runner = ShardRunner(options, settings, self.limiter, self.pool)
        self.syncing: asyncio.Task[None] | None = None

    async def run(self, items: list[tuple[int, str]], tar_name: str | None) -> Part:
        if self.syncing is None:
            self.syncing = asyncio.create_task(self._sync_forever())
        outcomes = await self.runner.run(items, tar_name)
        return await asyncio.to_thread(Part.of, outcomes)  # encoded here, off the loop: not the driver's work

    async def pid(self) -> int:
        return os.getpid()

    async def _sync_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.limiter.wanted.wait(), SYNC_S)
            except TimeoutError:
                pass
            self.limiter.wanted.clear()
            self.limiter.apply(await self.leases.sync.remote(self.name, self.limiter.report()))


def fetch_pending(state: State, settings: StoreSettings, options: DownloadOptions,
                  target: Target) -> tuple[int, int]:
    """Fetch every pending URL on Ray; return (URLs finished, of which ok). Local files are left."""
    size = options.shard_size
    pending = _pending_urls(state)
    if pending == 0:
        return 0, 0
    workers, processes = _layout(options)
    with connect(options.address, workers * processes) as ray_:
        if options.address and options.ray_workers is None:
            workers = max(1, int(ray_.cluster_resources().get("CPU", 1)) // processes)
        driver = _Driver(state, settings, dataclasses.replace(options, processes=processes), size, workers,
                         Progress(pending, options.show_progress), target)
        try:
            return driver.run()
        finally:
            state.fold()  # the committed parts into `urls`, for the local engine and the manifest


def _layout(options: DownloadOptions) -> tuple[int, int]:
    """(workers, processes per worker): locally the cores are split among the workers."""
    workers = options.ray_workers or 1
    if options.processes:
        return workers, options.processes
    if options.address:
        return workers, 4
    return workers, max(1, DownloadOptions().workers // workers)


def _pending_urls(state: State) -> int:
    return state.db.execute("SELECT COUNT(*) FROM urls WHERE status IS NULL AND first_row IS NOT NULL "
                            "AND kind = 'url'").fetchone()[0]


class _CtrlC:
    """SIGINT noted by our own handler and raised between two `ray.wait` rounds (0.25 s). Left to
    Ray, a Ctrl-C could land inside its C++ wait and be lost while the workers, in the same process
    group, died of it and were restarted: the run then went on to the end (exit 0)."""

    def __init__(self) -> None:
        self.seen = False
        self.previous: Any = None

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            self.previous = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.seen = True

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class _Driver:
    def __init__(self, state: State, settings: StoreSettings, options: DownloadOptions, size: int, workers: int,
                 progress: Progress, target: Target) -> None:
        self.state, self.settings, self.options, self.size, self.progress = state, settings, options, size, progress
        self.target = target
        self.next_tar = next_shard_number(state.shards())  # --layout tar: a new tar name per shard attempt
        ceiling = options.concurrency * workers  # every worker's in-flight cap, on one host
        leases = f"imgclf-leases-{uuid.uuid4().hex}"
        # On the driver's node, which the run needs anyway: a lost node must not take the limits with it.
        here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)
        self.leases = _Leases.options(name=leases, scheduling_strategy=here).remote(ceiling, options.per_host)
        self.workers = [_Worker.options(num_cpus=options.workers).remote(options, settings, leases)
                        for _ in range(workers)]
        self.shards = iter_shards(state.iter_pending(), size)
        self.retry: deque[Shard] = deque()
        self.attempts: Counter[int] = Counter()
        self.inflight: dict[Any, tuple[int, Shard]] = {}
        self.open = [0] * workers
        self.failed: list[tuple[Shard, str]] = []
        # worker -> its ping, until it answers. Every worker starts here: a shard sent to an actor
        # not yet placed waits for its placement, which never comes if its node is lost meanwhile
        # (seen: a run hung); a placed actor's lost shards fail at once and are sent again.
        self.down: dict[int, Any] = {i: worker.pid.remote() for i, worker in enumerate(self.workers)}
        self.ping_at: dict[int, float] = {}  # a restarting worker (its ping failed): when to ask again
        self.all_down_since: float | None = None  # when the last live worker was lost
        self.exhausted = False  # every pending shard has been handed out once
        self.worker_lost = False
        self.done = self.ok = 0

    def run(self) -> tuple[int, int]:
        ctrl_c = _CtrlC()
        try:
            with self.progress, ctrl_c:
                while True:
                    ctrl_c.check()
                    self._fill()
                    if not self.inflight and (not self.down or self._nothing_left()):
                        self._note_not_back()
                        break
                    self._check_all_down()
                    self._ping_again()
                    waiting = [*self.inflight, *(ping for ping in self.down.values() if ping is not None)]
                    finished = ray.wait(waiting, num_returns=1, timeout=_WAIT_S)[0] if waiting else []
                    if not waiting:
                        time.sleep(_WAIT_S)
                    for ref in finished:
                        self._finish(ref) if ref in self.inflight else self._pinged(ref)
                    self.progress.tick()
        except KeyboardInterrupt:
            # Ctrl-C: committed shards stay; the caller writes the manifest (the rest `pending`) and
            # exits 130, as the single-machine run does. It carries what this run finished.
            interrupted = KeyboardInterrupt()
            interrupted.done, interrupted.ok = self.done, self.ok  # type: ignore[attr-defined]
            raise interrupted from None
        finally:
            self._stop_actors()
        if self.worker_lost:
            self._clean_up_after_lost_workers()
        if self.failed:
            shard, reason = self.failed[0]
            raise ImgclfError(
                f"download: {len(self.failed)} shard(s) failed {self.options.shard_retries + 1} times; first "
                f"{shard.describe(self.size)}: {reason}. Every other shard is committed; run the same "
                "command again to retry")
        return self.done, self.ok

    def _ping_again(self) -> None:
        now = time.monotonic()
        for index, due in list(self.ping_at.items()):
            if due <= now:
                del self.ping_at[index]
                self.down[index] = self.workers[index].pid.remote()

    def _nothing_left(self) -> bool:
        """No shard in flight, queued or still to cut: lost workers need not come back."""
        return self.exhausted and not self.retry

    def _note_not_back(self) -> None:
        if self.down:
            log.warning("%d Ray worker(s) lost or never placed (no room on the nodes left?); "
                        "the other workers did their shards", len(self.down))

    def _check_all_down(self) -> None:
        """No worker answering, work left: wait a bounded time for Ray to (re)start one, then give up."""
        if len(self.down) < len(self.workers):
            self.all_down_since = None
            return
        now = time.monotonic()
        if self.all_down_since is None:
            self.all_down_since = now
        elif now - self.all_down_since > RESTART_WAIT_S:
            raise ImgclfError(
                f"download: no Ray worker answered for {RESTART_WAIT_S:.0f} s (nodes lost, or no node "
                f"with {self.options.workers} free CPUs, one per --processes); committed shards are kept, "
                "run the same command again to resume")

    def _stop_actors(self) -> None:
        """Kill the actors, which ends their open shards (an actor task cannot be force-cancelled:
        `ray.cancel(force=True)` raised ValueError here and hid a Ctrl-C). Best effort: after a
        Ctrl-C sent to the whole process group, parts of Ray may already be gone."""
        for actor in [*self.workers, self.leases]:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001, S112 - Ray's own types; the cluster is shut down next anyway
                continue

    def _fill(self) -> None:
        """Give live workers shards, one each per round (retries first), until each has OPEN_PER_WORKER."""
        while True:
            hungry = [i for i in range(len(self.workers)) if i not in self.down and self.open[i] < OPEN_PER_WORKER]
            for index in sorted(hungry, key=lambda i: self.open[i]):  # the least busy first
                shard = self.retry.popleft() if self.retry else next(self.shards, None)
                if shard is None:
                    self.exhausted = True  # (the retry queue is empty here too)
                    return
                tar_name = None
                if self.settings.layout == "tar":
                    tar_name, self.next_tar = shard_name(self.next_tar), self.next_tar + 1
                self.inflight[self.workers[index].run.remote(shard.items, tar_name)] = (index, shard)
                self.open[index] += 1
            if not hungry:
                return

    def _finish(self, ref: Any) -> None:
        index, shard = self.inflight.pop(ref)
        self.open[index] -= 1
        try:
            part = ray.get(ref)
        except ray.exceptions.RayError as err:
            self._failed(index, shard, err)
            return
        self.state.commit_part(part)  # one small transaction per shard: the commit point
        self.done += part.rows
        self.ok += part.counts.get("ok", 0)
        for status, n in part.counts.items():
            for _ in range(n):
                self.progress.advance(status)

    def _failed(self, index: int, shard: Shard, err: BaseException) -> None:
        if isinstance(err, ray.exceptions.RayActorError):
            # Died (killed, OOM, node lost): Ray restarts it; no shard goes to it before it answers.
            self.worker_lost = True  # it may have left partial files behind
            if index not in self.down:
                log.warning("Ray worker %d lost (%s); its open shards go back to the queue for the "
                            "live workers", index, type(err).__name__)
                self.down[index] = self.workers[index].pid.remote()
            if isinstance(err, ray.exceptions.ActorUnavailableError):
                self.retry.append(shard)  # sent while it was restarting: never ran, not an attempt
                return
        self.attempts[shard.index] += 1
        if self.attempts[shard.index] <= self.options.shard_retries:
            self.retry.append(shard)
        else:
            cause = getattr(err, "cause", None) or err
            self.failed.append((shard, first_line(cause)))

    def _pinged(self, ref: Any) -> None:
        """A restarted worker answered (back in service), or not yet (ask again)."""
        index = next(i for i, r in self.down.items() if r is not None and r == ref)
        try:
            ray.get(ref)
            del self.down[index]
        except ray.exceptions.ActorUnavailableError:
            # Restarting: ask again in a moment, without holding up the commits of the others.
            self.down[index] = None
            self.ping_at[index] = time.monotonic() + _WAIT_S
        except ray.exceptions.RayActorError as err:  # gone for good: it cannot start (or restart)
            reason = first_line(getattr(err, "cause", None) or err)
            raise ImgclfError(f"download: a Ray worker cannot start ({reason}); committed shards are kept, "
                              "run the same command again to resume") from None

    def _clean_up_after_lost_workers(self) -> None:
        """A killed worker may have left partial files, stored files and tars never committed: drop them."""
        from imgclf.download._commit import remove_orphans

        if not self.target.remote:
            shutil.rmtree(Path(self.target.out) / TMP_DIR, ignore_errors=True)
        remove_orphans(self.state, self.target)
