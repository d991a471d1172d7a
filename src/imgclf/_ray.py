"""Where Ray work runs (download and predict --engine ray): a private local Ray, or a cluster.

    with imgclf._ray.connect(address=None, cpus=2) as ray: ...   # private, stopped at the end
    with imgclf._ray.connect(address="HOST:6379", cpus=0) as ray: ...

A private cluster is this command's alone and is stopped when it ends:
- every listener on 127.0.0.1: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before ray is first imported
  (a new local cluster otherwise listens on all interfaces);
- token authentication with a random token that lives only in the environment of its processes
  (Ray 2.60's default would write ~/.ray/auth_token, outside DATA_DIR);
- its own temporary directory, no dashboard, `num_cpus` = what the workers reserve, workers at
  nice 0 (Ray's default 15 starves them on a machine doing anything else);
- a reaper process (`_reaper`) that SIGKILLs whatever is left of it once this process is gone,
  even after a SIGKILL (Ray's agents were seen outliving a killed driver by 30-80 s).
A Ray already initialised in this process (a notebook, a test fixture) is used as it is.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from imgclf import _reaper
from imgclf.errors import ConfigError, ImgclfError, first_line

INSTALL_HINT = "pip install 'imgclf[ray]'"
_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_worker_niceness")  # set for a private cluster, restored after


def import_ray() -> ModuleType:
    """`ray`, imported so that a local cluster binds loopback only; one line if it is missing."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--engine ray needs Ray, an optional extra: {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def connect(address: str | None, cpus: int) -> Iterator[ModuleType]:
    """Ray, connected: to `address`, or to a private local cluster with `cpus` CPUs (stopped after)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ImgclfError(f"cannot connect to the Ray cluster at {address}: "
                              f"{first_line(err, with_type=False)}") from None
        try:
            yield ray
        finally:
            ray.shutdown()
        return
    with _private(ray, cpus):
        yield ray


@functools.cache
def _process_token() -> str:
    """One random token per process: Ray's core reads the token once and keeps it, so a second
    private cluster in the same process (a notebook, a test module after another) given a new token
    could not talk to its own GCS ("Failed to start GCS", three attempts out of three)."""
    return secrets.token_hex(32)


@contextlib.contextmanager
def _private(ray: ModuleType, cpus: int) -> Iterator[None]:
    temp = tempfile.mkdtemp(prefix="imgclf-ray-")  # short: Ray's unix socket paths must stay < 108 bytes
    saved = {name: os.environ.get(name) for name in _ENV}
    # With a token in the environment and no RAY_AUTH_MODE, ray.init turns token auth on without
    # writing ~/.ray/auth_token (RAY_AUTH_MODE itself is read when ray is imported: too early here).
    os.environ["RAY_AUTH_TOKEN"] = _process_token()
    # Ray starts its workers at nice 15: on a machine running anything else they starve (measured:
    # 0.55x of the single process with 1 worker). The work is this command's own: run it at its priority.
    os.environ["RAY_worker_niceness"] = "0"
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)  # "token auth is enabled"
    reaper = subprocess.Popen([sys.executable, str(Path(_reaper.__file__))], stdin=subprocess.PIPE,
                              start_new_session=True, close_fds=True)
    try:
        _start(ray, cpus, temp, reaper)
        yield
    finally:
        try:
            ray.shutdown()
        finally:
            _finish(reaper)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            shutil.rmtree(temp, ignore_errors=True)


def _start(ray: ModuleType, cpus: int, temp: str, reaper: subprocess.Popen) -> None:
    """ray.init, twice if need be: Ray's own start-up limits are fixed (30 s for the raylet to
    register), and a machine busy with other work can miss them once."""
    before = set(_reaper.descendants(os.getpid())) | {reaper.pid}
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
                     logging_level=logging.WARNING, object_store_memory=256 * 2**20)
            _watch(reaper, [p for p in _reaper.descendants(os.getpid()) if p not in before])
            return
        except Exception as err:  # noqa: BLE001 - Ray raises plain Exception for a start-up timeout
            ray.shutdown()
            started = [p for p in _reaper.descendants(os.getpid()) if p not in before]
            _reaper.reap([(p, t) for p in started if (t := _reaper.start_time(p)) is not None])
            if attempt == 2:
                raise ImgclfError(f"could not start a local Ray ({first_line(err)}); is the machine "
                                  "overloaded? Run the same command again") from None


def _watch(reaper: subprocess.Popen, pids: list[int]) -> None:
    lines = "".join(f"{pid} {started}\n" for pid in pids if (started := _reaper.start_time(pid)) is not None)
    assert reaper.stdin is not None
    reaper.stdin.write(lines.encode())
    reaper.stdin.flush()


def _finish(reaper: subprocess.Popen) -> None:
    """Close the reaper's stdin: it kills what ray.shutdown() left, then exits."""
    assert reaper.stdin is not None
    with contextlib.suppress(OSError):
        reaper.stdin.close()
    try:
        reaper.wait(10)
    except subprocess.TimeoutExpired:
        reaper.kill()
        reaper.wait()
