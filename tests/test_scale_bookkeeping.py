"""Exact resume with the parts bookkeeping (download/_parts.py, issue 25 item 1), under SIGKILL at
random points.

1. The state itself: a child process commits shards as parts and folds them now and then (the
   large-fold path with its index rebuild included) and is SIGKILLed after a seeded random delay;
   reopening the state must hold every shard the child saw committed, whole, applied once, and
   nothing else; committing the rest then gives exactly the state of a run never killed.
2. The Ray engine end to end (real HTTP server on 127.0.0.1, real images): the driver, or one
   worker, SIGKILLed once a seeded random number of rows is committed; after the resume (or the
   run's own recovery) the manifest equals the one of a run never killed, and no row committed
   before the kill was fetched again.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from fault_server import FaultServer
from helpers import state_urls

from imgclf import _reaper
from imgclf.download._parts import Part
from imgclf.download._shards import iter_shards
from imgclf.download._state import STATE_NAME, Outcome, State
from imgclf.stages import download

ROWS, SHARD = 20_000, 50  # 400 shards: a child on an idle machine is still committing at 0.4 s

# The child: State with ROWS pending URLs, then one part per shard (printing each shard index once
# its commit returned), a fold every few shards. `_REINDEX_ROWS` is lowered so that the folds take
# the drop-and-rebuild index path that a billion-row run takes.
_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from imgclf.download import _parts
    from imgclf.download._parts import Part
    from imgclf.download._shards import iter_shards
    from imgclf.download._state import State
    sys.path.insert(0, sys.argv[3])
    from test_scale_bookkeeping import outcome_of

    _parts._REINDEX_ROWS = 120
    state = State(Path(sys.argv[1]))
    fold_every = int(sys.argv[2])
    for n, shard in enumerate(iter_shards(state.iter_pending(), {shard}), 1):
        state.commit_part(Part.of([outcome_of(i) for i, _ in shard.items]))
        print(shard.index, flush=True)
        if n % fold_every == 0:
            state.fold()
""").format(shard=SHARD)


def outcome_of(url_id: int) -> Outcome:
    """A synthetic outcome, a pure function of the URL id (so two runs can be compared)."""
    sha = f"{url_id:064x}"
    if url_id % 7 == 0:
        return Outcome(url_id, "http_error", "HTTP 404", 404, 1)
    return Outcome(url_id, "ok", "", 200, 1, sha, f"images/{sha[:2]}/{sha}.jpg", 8, 8, 100 + url_id)


def _fill(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    state = State(data_dir)
    state.db.execute("BEGIN")
    state.db.executemany("INSERT INTO urls(id, url, first_row) VALUES (?, ?, ?)",
                         [(i, f"https://h{i % 13}.test/{i}.jpg", i - 1) for i in range(1, ROWS + 1)])
    state.db.execute("COMMIT")
    state.close()


def _urls_table(data_dir: Path) -> list[tuple]:
    with sqlite3.connect(data_dir / STATE_NAME) as db:
        return db.execute("SELECT id, status, error, http_status, attempts, sha256, path, width, height, bytes "
                          "FROM urls ORDER BY id").fetchall()


def _finish(data_dir: Path) -> None:
    """The resume: commit what is pending, as the driver would."""
    state = State(data_dir)
    for shard in iter_shards(state.iter_pending(), SHARD):
        state.commit_part(Part.of([outcome_of(i) for i, _ in shard.items]))
    state.fold()
    state.close()


@pytest.fixture(scope="module")
def never_killed(tmp_path_factory: pytest.TempPathFactory) -> list[tuple]:
    data_dir = tmp_path_factory.mktemp("ref") / "d"
    _fill(data_dir)
    _finish(data_dir)
    table = _urls_table(data_dir)
    assert all(row[1] is not None for row in table)
    return table


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_sigkill_while_committing_and_folding_loses_and_repeats_nothing(seed: int, tmp_path: Path,
                                                                         never_killed: list[tuple]) -> None:
    rng = random.Random(seed)
    data_dir = tmp_path / "d"
    _fill(data_dir)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(data_dir), str(rng.randint(1, 6)), str(Path(__file__).parent)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Past the child's start-up (imports, opening the state): into its commits and folds.
    first = child.stdout.readline()
    assert first.strip().isdigit(), child.stderr.read()[-2000:]
    time.sleep(rng.uniform(0.0, 0.4))
    child.send_signal(signal.SIGKILL)
    out = child.stdout.read()  # (not communicate(): it would skip what readline() buffered)
    child.wait(30)
    child.stderr.close()
    seen = {int(first)} | {int(line) for line in out.split()}
    assert child.returncode == -signal.SIGKILL
    assert len(seen) < ROWS // SHARD, "the child finished before the kill; kill earlier"

    state = State(data_dir)  # opening folds what was committed
    assert state.db.execute("SELECT COUNT(*) FROM parts").fetchone()[0] == 0
    state.close()
    table = _urls_table(data_dir)
    done = {row[0] for row in table if row[1] is not None}
    shards_done = {(i - 1) // SHARD for i in done}
    # Whole shards only: each done shard has all its rows; every shard seen committed is there, plus
    # at most the one committed after the child's last line.
    assert all(all((s * SHARD + k + 1) in done for k in range(SHARD)) for s in shards_done)
    assert seen <= shards_done and len(shards_done - seen) <= 1
    assert [row for row in table if row[0] in done] == [row for row in never_killed if row[0] in done]
    assert all(row[4] == 1 for row in table if row[0] in done)  # applied once (attempts add up)

    _finish(data_dir)
    assert _urls_table(data_dir) == never_killed


def test_a_reader_sees_committed_parts_before_they_are_folded(tmp_path: Path) -> None:
    from imgclf.download._state import committed_urls

    data_dir = tmp_path / "d"
    _fill(data_dir)
    state = State(data_dir)
    shard = next(iter_shards(state.iter_pending(), SHARD))
    state.commit_part(Part.of([outcome_of(i) for i, _ in shard.items]))
    with sqlite3.connect(f"file:{data_dir / STATE_NAME}?mode=ro", uri=True) as db:
        assert committed_urls(db) == {url for _, url in shard.items}
        assert db.execute("SELECT COUNT(*) FROM urls WHERE status IS NOT NULL").fetchone()[0] == 0
    assert state.fold() == SHARD
    state.close()


# --- the Ray engine, end to end -------------------------------------------------------------------

def _ray_or_skip() -> None:
    from imgclf._ray import import_ray
    from imgclf.errors import ConfigError

    try:
        import_ray()
    except ConfigError:
        pytest.skip("the ray extra is not installed (pip install 'imgclf[ray]')")


def _png(i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (i % 256, (i // 256) * 40, 90)).save(buf, "PNG")
    return buf.getvalue()


def _cli(out: Path, src: Path) -> list[str]:
    return [sys.executable, "-m", "imgclf", "download", str(src), "--out", str(out), "--no-progress",
            "--engine", "ray", "--workers", "2", "--shard-size", "10", "--concurrency", "2", "--processes", "1"]


def _ray_workers(pid: int) -> list[int]:
    def cmdline(p: int) -> bytes:
        try:
            return Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            return b""

    return [p for p in _reaper.descendants(pid) if cmdline(p).startswith(b"ray::_Worker")]


COLUMNS = ["row", "url", "label", "status", "error", "http_status", "sha256", "path", "width", "height", "bytes",
           "duplicate_of"]


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "victim"), [(11, "driver"), (12, "worker"), (13, "driver")])
def test_ray_sigkill_at_a_random_point_then_resume_gives_the_unkilled_manifest(seed: int, victim: str,
                                                                               tmp_path: Path) -> None:
    _ray_or_skip()
    rng = random.Random(seed)
    n = 120
    with FaultServer(latency=0.15) as srv:
        urls = [srv.add(f"{i}.png", _png(i), "image/png") for i in range(n)]
        urls += [srv.url("status/404"), urls[3]]  # a failure and a duplicate row
        src = tmp_path / "urls.csv"
        pd.DataFrame({"url": urls, "label": [f"c{i % 3}" for i in range(len(urls))]}).to_csv(src, index=False)
        reference = download.run(download.DownloadOptions(
            sources=[src], out=tmp_path / "ref", timeout=3.0, retries=1, backoff=0.05, processes=1, show_progress=False,
            print_summary=False))
        srv.counts.clear()

        state = tmp_path / "d" / STATE_NAME
        at = rng.randint(10, 80)
        proc = subprocess.Popen(_cli(tmp_path / "d", src), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        deadline = time.monotonic() + 180
        while len(state_urls(state)) < at and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()[-2000:]!r}"
        workers = _ray_workers(proc.pid)
        committed, at_kill = state_urls(state), dict(srv.counts)
        if victim == "driver":
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            rerun = subprocess.run(_cli(tmp_path / "d", src), capture_output=True, text=True, timeout=300)
            assert rerun.returncode == 0, rerun.stderr[-2000:]
        else:
            assert workers, "no Ray worker process found to kill"
            os.kill(rng.choice(workers), signal.SIGKILL)
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-2000:]
    assert at <= len(committed) < n, "the kill did not land mid-run"
    got = pd.read_parquet(tmp_path / "d" / "manifest.parquet")[COLUMNS]
    pd.testing.assert_frame_equal(got, pd.read_parquet(reference.manifest_path)[COLUMNS])
    for url in committed:  # a row committed before the kill is never fetched again
        path = "/" + url.split("/", 3)[3]
        assert srv.counts[path] == at_kill[path] == 1, path
    assert all(srv.counts[f"/file/{i}.png"] >= 1 for i in range(n))  # every row fetched in the end
    stored = {p.relative_to(tmp_path / "d").as_posix() for p in (tmp_path / "d" / "images").glob("*/*")}
    assert stored == set(got.loc[got["status"] == "ok", "path"])  # no orphan file, none missing
