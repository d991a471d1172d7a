"""`imgclf predict --engine ray` (predict/_ray.py) on a private 2-CPU Ray: the same rows as the
single-process predict, data directories (tar shards) as inputs, a SIGKILLed run that resumes from
its finished parts, and no Ray process left behind (checked by pid).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import CLASSES, DEMO_ROOT
from storage_helpers import demo_files, download_demo, write_sources

from imgclf import _reaper
from imgclf._localserver import LocalServer
from imgclf._ray import import_ray
from imgclf.errors import ConfigError, DataError
from imgclf.stages import predict

try:
    import_ray()
except ConfigError:
    pytest.skip("the ray extra is not installed (pip install 'imgclf[ray]')", allow_module_level=True)

from imgclf._ray import connect  # noqa: E402
from imgclf.predict import _ray  # noqa: E402

QUIET = predict.PredictOptions(progress=False, batch_size=8)


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if _reaper.start_time(p) is not None
            and b"defunct" not in Path(f"/proc/{p}/stat").read_bytes()}


def _wait_gone(pids: set[int], seconds: float = 20) -> set[int]:
    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _alive(pids)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _same(got: list[dict[str, str]], want: list[dict[str, str]], names: bool = True) -> bool:
    """Same rows; probabilities within 1e-5 (batches are cut differently, so the last bits may move)."""
    if len(got) != len(want):
        return False
    for a, b in zip(got, want, strict=True):
        for key in a:
            if key == "input" and not names:
                continue
            if key.startswith("probability") and a[key] and b[key]:
                if abs(float(a[key]) - float(b[key])) > 1e-5:
                    return False
            elif a[key] != b[key]:
                return False
    return True


@pytest.fixture(scope="module")
def cluster():
    """One private 2-CPU Ray for the in-process tests; afterwards every one of its processes is gone."""
    seen: set[int] = set()
    with connect(None, 2):
        yield seen
        seen.update(_reaper.descendants(os.getpid()))
    assert not _wait_gone(seen), "Ray processes left behind"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory):
    """A folder of 9 test images, and a data directory of 12 train images in tar shards."""
    tmp = tmp_path_factory.mktemp("pray")
    train = demo_files("train", CLASSES[:3], 4)
    with LocalServer(DEMO_ROOT) as srv:
        download_demo(tmp / "data", write_sources(tmp / "src", srv, {"train": train}), layout="tar", shard_size=5)
    folder = tmp / "photos"
    folder.mkdir()
    for f in demo_files("test", CLASSES[:3], 3):
        (folder / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
    return tmp, folder, train


def test_ray_predict_gives_the_single_process_rows_in_input_order(cluster, inputs, tiny_run: Path) -> None:
    tmp, folder, train = inputs
    out = tmp / "ray.csv"
    result = _ray.run(dataclasses.replace(QUIET, inputs=(str(folder), str(tmp / "data"), str(tmp / "missing.png")),
                                          model=tiny_run, out=out), _ray.RayOptions(workers=2, shard_size=4))
    assert (result.ok, result.failed) == (21, 1) and result.out == out
    assert not out.with_name("ray.csv.parts").exists()  # merged, parts removed
    got = _rows(out)
    # The folder and a missing file, as the single-process predict writes them.
    single = tmp / "single.csv"
    predict.run(dataclasses.replace(QUIET, inputs=[str(folder), str(tmp / "missing.png")], model=tiny_run, out=single))
    want = _rows(single)
    assert _same(got[:9] + got[-1:], want)
    # The data directory's rows (read from its tar shards), named by url: the originals' predictions.
    originals = tmp / "originals.csv"
    predict.run(dataclasses.replace(QUIET, inputs=[str(f) for f in train], model=tiny_run, out=originals))
    by_url = got[9:21]
    assert [r["input"].rsplit("/", 1)[-1] for r in by_url] == [f.name for f in train]
    assert _same(by_url, _rows(originals), names=False)



def test_a_parts_data_dir_is_sliced_for_the_workers_and_predicts_like_its_one_file_manifest(
        cluster, inputs, tiny_run: Path, tmp_path: Path) -> None:
    """The same data directory with its manifest rewritten as parts of 5 rows (row groups of 3): the
    driver cuts it into footer-only slices, workers read their rows; rows, order and names unchanged."""
    import pyarrow as pa

    from imgclf import manifest
    from imgclf.download._report import _Parts

    tmp, _, _ = inputs
    parts_dir = tmp_path / "data"
    shutil.copytree(tmp / "data", parts_dir)
    frame = manifest.read_manifest(parts_dir)
    broken = frame.index[1]
    frame.loc[broken, "status"] = "http_error"  # a row that is not ok is left out, as read_manifest's way does
    table = pa.Table.from_pandas(frame, preserve_index=False)
    _Parts(parts_dir, 5).write(iter([table.slice(i, 3) for i in range(0, table.num_rows, 3)]))
    assert manifest.is_parts(parts_dir) and not (parts_dir / manifest.MANIFEST_NAME).exists()
    slices = list(_ray.part_slices(str(parts_dir), 2))
    assert sum(s.stop - s.start for s in slices) == len(frame) and max(s.stop - s.start for s in slices) <= 2
    assert [len(shard) for shard in _ray.cut_shards(slices, 4)][0] >= 2  # slices share a shard up to its size

    got_path, want_path = tmp_path / "parts.csv", tmp_path / "one.csv"
    result = _ray.run(dataclasses.replace(QUIET, inputs=(str(parts_dir),), model=tiny_run, out=got_path),
                      _ray.RayOptions(workers=2, shard_size=2))
    assert (result.ok, result.failed) == (len(frame) - 1, 0)
    _ray.run(dataclasses.replace(QUIET, inputs=(str(tmp / "data"),), model=tiny_run, out=want_path),
             _ray.RayOptions(workers=2))
    want = [r for r in _rows(want_path) if r["input"] != frame.loc[broken, "url"]]
    assert _same(_rows(got_path), want)


def test_a_bad_model_is_one_line_before_ray_starts(inputs, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such model"):
        _ray.run(dataclasses.replace(QUIET, inputs=(str(inputs[1]),), model=tmp_path / "nothing.ckpt",
                                     out=tmp_path / "o.csv"))


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_from_finished_parts_and_leaves_no_process(inputs, tiny_run: Path,
                                                                             tmp_path: Path) -> None:
    tmp, folder, _ = inputs
    out = tmp_path / "p.csv"
    cmd = [sys.executable, "-m", "imgclf", "predict", "--engine", "ray", "--workers", "1", "--shard-size", "1",
           "--model", str(tiny_run), str(tmp / "data"), str(folder), "-o", str(out), "--no-progress"]
    parts = tmp_path / "p.csv.parts"
    seen: set[int] = set()
    stop = threading.Event()

    def watch(proc: subprocess.Popen) -> None:
        while not stop.is_set() and proc.poll() is None:
            seen.update(_reaper.descendants(proc.pid))
            time.sleep(0.1)

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watcher = threading.Thread(target=watch, args=(proc,))
    watcher.start()
    deadline = time.monotonic() + 600  # Ray's start and a worker's first torch import: minutes on a busy machine
    while len(list(parts.glob("part-*.json"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    stop.set()
    watcher.join()
    finished = len(list(parts.glob("part-*.json")))
    assert 3 <= finished < 21, "the kill did not land mid-run"
    assert not _wait_gone(seen), "Ray processes outlived the killed predict"

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{finished} of 21 shards already done" in rerun.stderr
    rows = _rows(out)
    assert len(rows) == 21 and {r["status"] for r in rows} == {"ok"} and not parts.exists()
