"""`imgclf download --engine ray` (download/_engine_ray.py, imgclf/_ray.py) on a local 2-CPU Ray
against the real test server: same manifest as the laptop path, a worker SIGKILLed mid-run, a
failing shard, the driver SIGKILLed and rerun, no Ray process left behind (checked by pid).

One private cluster serves the in-process tests of this module (ray.init costs 3-15 s here);
the CLI tests start their own, as a user's command does.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fault_server import FaultServer
from helpers import state_urls
from PIL import Image

from imgclf import _reaper
from imgclf._ray import import_ray
from imgclf.errors import ConfigError, ImgclfError
from imgclf.stages import download

try:
    import_ray()
except ConfigError:
    pytest.skip("the ray extra is not installed (pip install 'imgclf[ray]')", allow_module_level=True)

from imgclf._ray import connect  # noqa: E402
from imgclf.download._engine_ray import OPEN_PER_WORKER  # noqa: E402

FAST = dict(timeout=3.0, read_timeout=2.0, connect_timeout=1.0, retries=1, backoff=0.05, processes=1,
            show_progress=False, print_summary=False)


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (i % 256, (i // 256) * 40, 200)).save(buf, "PNG")
    return buf.getvalue()


def _urls(srv: FaultServer, n: int, prefix: str = "") -> list[str]:
    return [srv.add(f"{prefix}{i}.png", _png(i), "image/png") for i in range(n)]


def _write(tmp: Path, urls: list[str]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"url": urls, "label": [f"c{i % 3}" for i in range(len(urls))]}).to_csv(tmp / "train.csv",
                                                                                        index=False)
    return tmp / "train.csv"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _state(pid: int) -> bytes:
    """The process state letter of /proc/PID/stat (Z: a zombie, dead and waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return b""


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists() and b"defunct" not in _cmdline(p)
            and _reaper.start_time(p) is not None and _state(p) not in (b"Z", b"X", b"")}


@pytest.fixture(scope="module")
def cluster():
    """One private 2-CPU Ray for this module; afterwards every one of its processes must be gone."""
    seen: set[int] = set()
    with connect(None, 2):
        seen.update(_reaper.descendants(os.getpid()))
        yield seen
        seen.update(_reaper.descendants(os.getpid()))
    deadline = time.monotonic() + 15
    while _alive(seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(seen), f"Ray processes left behind: {[_cmdline(p)[:60] for p in _alive(seen)]}"


def test_ray_download_gives_the_laptop_manifest(cluster, tmp_path: Path) -> None:
    with FaultServer() as srv:
        urls = _urls(srv, 90)
        urls += [srv.url("status/404"), srv.url("flaky/k/503/1/0.png"), urls[4], "ftp://x/y.png"]
        src = _write(tmp_path, urls)
        result = download.run(download.DownloadOptions(sources=[src], out=tmp_path / "ray", **FAST, engine="ray",
                                                       ray_workers=2, shard_size=16))
        fetched_once = dict(srv.counts)
        local = download.run(download.DownloadOptions(sources=[src], out=tmp_path / "local", **FAST))
    columns = ["row", "url", "status", "error", "http_status", "sha256", "path", "duplicate_of"]
    manifest = pd.read_parquet(result.manifest_path)
    pd.testing.assert_frame_equal(manifest[columns], pd.read_parquet(local.manifest_path)[columns])
    assert manifest.loc[91, "attempts"] == 2  # the 503 was retried by the worker's Fetcher
    assert result.counts == local.counts == {"ok": 90, "duplicate": 2, "http_error": 1, "invalid_url": 1}
    assert all(fetched_once[f"/file/{i}.png"] == 1 for i in range(90))  # no URL in two shards


def test_worker_sigkill_costs_at_most_its_open_shards(cluster, tmp_path: Path) -> None:
    shard = 12
    with FaultServer(latency=0.1) as srv:
        urls = _urls(srv, 200)
        src = _write(tmp_path, urls)
        state = tmp_path / "d" / download.STATE_NAME
        killed: dict[str, object] = {}

        def kill_one_worker() -> None:
            deadline = time.monotonic() + 120
            while len(state_urls(state)) < 3 * shard and time.monotonic() < deadline:
                time.sleep(0.05)
            workers = [p for p in cluster | set(_reaper.descendants(os.getpid()))
                       if _cmdline(p).startswith(b"ray::_Worker")]
            killed["done"], killed["counts"] = state_urls(state), dict(srv.counts)
            if workers:
                os.kill(workers[0], signal.SIGKILL)
                killed["pid"] = workers[0]

        killer = threading.Thread(target=kill_one_worker)
        killer.start()
        result = download.run(download.DownloadOptions(sources=[src], out=tmp_path / "d", **FAST, engine="ray",
                                                       ray_workers=2, shard_size=shard, concurrency=4))
        killer.join()
    assert "pid" in killed, "no Ray worker process found to kill"
    done = killed["done"]
    assert 3 * shard <= len(done) < len(urls), "the kill did not land mid-run"
    assert result.counts == {"ok": 200}
    for url in done:  # a committed row is never fetched again
        assert srv.counts["/" + url.split("/", 3)[3]] == 1
    refetched = sum(n - 1 for n in srv.counts.values())
    assert 1 <= refetched <= OPEN_PER_WORKER * shard, refetched  # only the killed worker's open shards
    assert not any((tmp_path / "d" / ".tmp").glob("*")) if (tmp_path / "d" / ".tmp").exists() else True


def test_a_failing_shard_is_retried_then_named(cluster, tmp_path: Path) -> None:
    bodies = [_png(i) for i in range(60)]
    prefixes = [hashlib.sha256(b).hexdigest()[:2] for b in bodies]
    blocked = prefixes[25]
    keep = [i for i in range(60) if prefixes[i] != blocked or i == 25]  # one image in the blocked folder
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "images" / blocked).write_text("a file where a folder should be")  # a storage error
    with FaultServer() as srv:
        urls = [srv.add(f"{i}.png", bodies[i], "image/png") for i in keep]
        src = _write(tmp_path, urls)
        failing = keep.index(25) // 10  # URL ids follow the input order, from 1
        with pytest.raises(ImgclfError, match=rf"1 shard\(s\) failed 2 times; first shard {failing} \(URL ids"):
            download.run(download.DownloadOptions(sources=[src], out=tmp_path / "d", **FAST, engine="ray",
                                                  ray_workers=2, shard_size=10, shard_retries=1))
        assert srv.counts["/file/25.png"] == 2  # the first attempt and one retry
    finished = state_urls(tmp_path / "d" / download.STATE_NAME)
    assert len(finished) == len(urls) - len(urls[failing * 10:(failing + 1) * 10])  # every other shard committed


def test_a_worker_that_cannot_be_placed_ends_the_run_in_one_line(cluster, tmp_path: Path, monkeypatch) -> None:
    """A worker needing more CPUs than any node has is never placed (as a lost node's worker with
    no room left): the run waits RESTART_WAIT_S for one, then ends in one line, nothing fetched."""
    from imgclf.download import _engine_ray

    monkeypatch.setattr(_engine_ray, "RESTART_WAIT_S", 2.0)
    with FaultServer() as srv:
        src = _write(tmp_path, _urls(srv, 5))
        raised: list[BaseException] = []

        def run() -> None:  # in a thread: the old driver waited for ever here
            try:
                download.run(download.DownloadOptions(sources=[src], out=tmp_path / "d", **{**FAST, "processes": 3},
                                                      engine="ray", ray_workers=1, shard_size=10))
            except BaseException as err:  # noqa: BLE001 - checked below
                raised.append(err)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "the run waited for ever for a worker Ray cannot place"
        assert len(raised) == 1 and isinstance(raised[0], ImgclfError), raised
        assert "no Ray worker answered for 2 s (nodes lost, or no node with 3 free CPUs" in str(raised[0])
        assert not srv.counts  # no shard was sent to a worker that never answered
    assert state_urls(tmp_path / "d" / download.STATE_NAME) == set()


def test_tar_layout_writes_one_tar_per_shard(cluster, tmp_path: Path) -> None:
    from imgclf import storage

    with FaultServer() as srv:
        src = _write(tmp_path, _urls(srv, 40))
        result = download.run(download.DownloadOptions(sources=[src], out=tmp_path / "d", **FAST, engine="ray",
                                                       ray_workers=2, shard_size=10, layout="tar"))
    manifest = pd.read_parquet(result.manifest_path)
    assert result.counts == {"ok": 40}
    assert manifest.groupby("shard")["row"].apply(list).tolist() == [list(range(i, i + 10)) for i in range(0, 40, 10)]
    for _, row in manifest.iterrows():
        data = storage.read_row(str(tmp_path / "d"), storage.RowRef(row["path"], row["shard"], row["offset"],
                                                                     row["bytes"]))
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
    assert not any((tmp_path / "d" / ".tmp").glob("*")) if (tmp_path / "d" / ".tmp").exists() else True


def _cli(tmp: Path, src: Path) -> list[str]:
    return [sys.executable, "-m", "imgclf", "download", str(src), "--out", str(tmp / "d"), "--no-progress",
            "--engine", "ray", "--workers", "2", "--shard-size", "15", "--concurrency", "2", "--processes", "1"]


def _watch(proc: subprocess.Popen, pids: set[int], stop: threading.Event) -> None:
    while not stop.is_set() and proc.poll() is None:
        pids.update(_reaper.descendants(proc.pid))
        time.sleep(0.1)


def _run_until_committed(tmp_path: Path, src: Path, rows: int, **popen: Any
                         ) -> tuple[subprocess.Popen, set[int], threading.Event, threading.Thread, Path]:
    """Start `imgclf download --engine ray` on `src` with a watcher collecting its process tree, and
    return once `rows` URLs are committed (or it ended, or 180 s passed): the moment to interrupt it."""
    state = tmp_path / "d" / download.STATE_NAME
    proc = subprocess.Popen(_cli(tmp_path, src), **popen)
    pids: set[int] = set()
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(proc, pids, stop))
    watcher.start()
    deadline = time.monotonic() + 180
    while len(state_urls(state)) < rows and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return proc, pids, stop, watcher, state


def test_driver_sigkill_then_rerun_resumes_and_leaves_no_ray_process(tmp_path: Path) -> None:
    with FaultServer(latency=0.2) as srv:
        urls = _urls(srv, 150)
        src = _write(tmp_path, urls)
        proc, pids, stop, watcher, state = _run_until_committed(tmp_path, src, 30, stdout=subprocess.DEVNULL,
                                                                stderr=subprocess.PIPE)
        assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()[-2000:]!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        stop.set()
        watcher.join()
        done, at_kill = state_urls(state), dict(srv.counts)
        assert 30 <= len(done) < len(urls), "the kill did not land mid-run"
        deadline = time.monotonic() + 20
        while _alive(pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pids), "Ray processes outlived the killed driver"

        rerun_pids: set[int] = set()
        rerun = subprocess.Popen(_cli(tmp_path, src), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(rerun, rerun_pids, stop))
        watcher.start()
        _, err = rerun.communicate(timeout=240)
        watcher.join()
        assert rerun.returncode == 0, err[-2000:]
    # Processes the run killed as it ended may take a moment to leave the table (their reaping by
    # init after the driver exits); one still alive after 20 s was left behind.
    deadline = time.monotonic() + 20
    while _alive(rerun_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rerun_pids and not _alive(rerun_pids), "a finished run left Ray processes behind"
    manifest = pd.read_parquet(tmp_path / "d" / "manifest.parquet")
    assert manifest["status"].value_counts().to_dict() == {"ok": 150}
    for url in done:
        path = "/" + url.split("/", 3)[3]
        assert srv.counts[path] == at_kill[path] == 1, path
    assert max(srv.counts.values()) <= 2
    stored = {p.relative_to(tmp_path / "d").as_posix() for p in (tmp_path / "d" / "images").glob("*/*")}
    assert stored == set(manifest["path"])  # no orphan file, none missing


def test_ctrl_c_ends_like_the_local_engine(tmp_path: Path) -> None:
    """A real SIGINT to the whole process group, as a terminal's Ctrl-C sends it, mid-run: exit 130,
    manifest and report written (the rest `pending`), no traceback, no Ray process left behind
    (issue 22: it was `ValueError: force=True is not supported for actor tasks`, exit 1, no manifest)."""
    with FaultServer(latency=0.2) as srv:
        src = _write(tmp_path, _urls(srv, 150))
        proc, pids, stop, watcher, _ = _run_until_committed(tmp_path, src, 30, stdout=subprocess.PIPE,
                                                            stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert proc.poll() is None, f"the run ended before the Ctrl-C: {proc.stderr.read()[-2000:]!r}"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        stop.set()
        watcher.join()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err and "ValueError" not in err
    manifest = pd.read_parquet(tmp_path / "d" / "manifest.parquet")
    counts = manifest["status"].value_counts().to_dict()
    assert len(manifest) == 150 and counts.get("ok", 0) >= 30 and counts.get("pending", 0) > 0
    report = json.loads((tmp_path / "d" / "download_report.json").read_text())
    assert report["interrupted"] is True and report["ok_this_run"] == counts["ok"]
    deadline = time.monotonic() + 20
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids and not _alive(pids), f"Ray processes outlived Ctrl-C: {[_cmdline(p)[:60] for p in _alive(pids)]}"


def test_missing_ray_is_one_line_saying_how_to_install_it(tmp_path: Path) -> None:
    src = tmp_path / "t.csv"
    src.write_text("url,label\nhttp://127.0.0.1:9/a.png,x\n")
    code = ("import sys; sys.modules['ray'] = None\n"
            "from imgclf.cli import main\n"
            f"sys.exit(main(['download', {str(src)!r}, '--out', {str(tmp_path / 'd')!r}, '--engine', 'ray']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "pip install 'imgclf[ray]'" in proc.stderr


def test_the_laptop_path_never_imports_ray(tmp_path: Path) -> None:
    with FaultServer() as srv:
        src = _write(tmp_path, _urls(srv, 3))
        code = ("import sys; from pathlib import Path; from imgclf.stages import download\n"
                f"download.run(download.DownloadOptions(sources=[Path({str(src)!r})], "
                f"out=Path({str(tmp_path / 'd')!r}), show_progress=False, print_summary=False))\n"
                "assert 'ray' not in sys.modules, 'ray imported'\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
