"""Object storage end to end against a real local S3 endpoint (moto's server on 127.0.0.1):
download to s3:// (tar shards and files), train one epoch with 2 DDP processes (gloo) reading the
tar shards from S3, evaluate from S3 and get the metrics that local files give.

Credentials and the endpoint reach every process only through AWS_* environment variables, as
for a real bucket. The server is stopped (its port closed) when the module ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CLASSES, DEMO_ROOT
from storage_helpers import demo_files, download_demo, moto_s3, write_sources

from imgclf import storage
from imgclf._localserver import LocalServer
from imgclf.errors import DataError
from imgclf.manifest import read_manifest, row_refs
from imgclf.stages import evaluate

pytest.importorskip("s3fs")
pytest.importorskip("moto")

TAR = "s3://bkt/tar"
FILES = "s3://bkt/files"


@pytest.fixture(scope="module")
def s3():
    with moto_s3("bkt") as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def s3_data(s3: str, tmp_path_factory: pytest.TempPathFactory):
    """12 train + 4 test images of 3 classes: in tar shards of 10 on S3, as files on S3, as local files."""
    tmp = tmp_path_factory.mktemp("s3")
    splits = {"train": demo_files("train", CLASSES[:3], 12), "test": demo_files("test", CLASSES[:3], 4)}
    with LocalServer(DEMO_ROOT) as srv:
        tables = write_sources(tmp / "src", srv, splits)
        tar = download_demo(TAR, tables, layout="tar", shard_size=10, state_dir=str(tmp / "state-tar"))
        files = download_demo(FILES, tables, state_dir=str(tmp / "state-files"))
        local = download_demo(tmp / "local", tables)
    return tmp, tar, files, local, splits["train"] + splits["test"]


def test_download_to_s3_writes_shards_manifest_and_report_there_and_state_locally(s3_data) -> None:
    import s3fs

    tmp, tar, _, _, originals = s3_data
    assert tar.counts == {"ok": 48}
    fs = s3fs.S3FileSystem()
    assert sorted(fs.ls("bkt/tar/shards", detail=False)) == [f"bkt/tar/shards/{n:05d}.tar" for n in range(5)]
    assert {p.rsplit("/", 1)[-1] for p in fs.ls("bkt/tar", detail=False)} == {
        "shards", "manifest.parquet", "download_report.json"}  # no state, no temporary file on S3
    assert (tmp / "state-tar" / ".state.sqlite").is_file()
    manifest = read_manifest(TAR)
    assert [storage.read_row(TAR, ref) for ref in row_refs(manifest)] == [f.read_bytes() for f in originals]
    report = json.loads(storage.read_bytes(TAR, "download_report.json"))
    assert report["counts"] == {"ok": 48}


def test_files_layout_on_s3_reads_back_like_local_files(s3_data) -> None:
    tmp, _, files, local, originals = s3_data
    assert files.counts == {"ok": 48}
    remote, here = read_manifest(FILES), read_manifest(tmp / "local")
    assert remote["path"].tolist() == here["path"].tolist() and (remote["shard"] == "").all()
    assert [storage.read_row(FILES, ref) for ref in row_refs(remote)] == [f.read_bytes() for f in originals]


def test_a_rerun_resumes_from_the_default_state_dir_and_fetches_nothing(s3: str, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with LocalServer(DEMO_ROOT) as srv:
        tables = write_sources(tmp_path / "src", srv, {"train": demo_files("train", CLASSES[:3], 2)})
        first = download_demo("s3://bkt/again", tables, layout="tar")
        second = download_demo("s3://bkt/again", tables, layout="tar")
    states = list((tmp_path / "cache" / "imgclf" / "state").iterdir())
    assert len(states) == 1 and (states[0] / "out.txt").read_text().strip() == "s3://bkt/again"
    assert first.fetched == 6 and second.fetched == 0 and second.counts == {"ok": 6}


def test_a_missing_s3_data_directory_is_one_line(s3: str) -> None:
    with pytest.raises(DataError, match="s3://bkt/nothing/manifest.parquet: no manifest"):
        read_manifest("s3://bkt/nothing")


@pytest.mark.slow
def test_ddp_epoch_from_tar_shards_on_s3_then_evaluate_gives_the_local_metrics(s3_data, tmp_path: Path) -> None:
    tmp = s3_data[0]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "imgclf", "train", "--data", TAR, "--out", str(run_dir), "trainer.epochs=1",
           "trainer.batch_size=8", "data.image_size=32", "data.num_workers=1", "data.cache=false",
           "trainer.progress_bar=false", "model.arch=mobilenet_v3_small", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # AWS_* from the fixture
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["data_dir"] == TAR
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # 36 train images, 6 to validation (15%): 30 over 2 ranks = 15 each, batch 8 with drop_last: 1 step
    # (one process would take 3).
    assert ckpt["global_step"] == 1

    options = {"split": "test", "num_workers": 0, "bootstrap_resamples": 50, "baseline_simulations": 50}
    remote = evaluate.run(evaluate.EvaluateOptions(model=run_dir, data=TAR, out=tmp_path / "e-s3", **options))
    local = evaluate.run(evaluate.EvaluateOptions(model=run_dir, data=tmp / "local", out=tmp_path / "e-local",
                                                  **options))
    assert remote["n_images"] == local["n_images"] == 12
    for key in ("f1_macro", "accuracy", "log_loss", "confusion_matrix", "f1_macro_ci95"):
        assert remote[key] == local[key], key
    assert remote["data_dir"] == TAR and (tmp_path / "e-s3" / "report.html").is_file()


def test_shard_cache_reads_remote_tar_shards_from_one_local_copy_each(s3_data, tmp_path: Path) -> None:
    from imgclf import data, presets
    from imgclf.config import DataConfig

    originals = s3_data[4]
    refs = row_refs(read_manifest(TAR))
    cache = tmp_path / "cache"
    assert [storage.read_row(TAR, ref, cache) for ref in refs] == [f.read_bytes() for f in originals]
    assert len(list(cache.glob("*.tar"))) == 5 and not list(cache.glob(".*"))  # one copy per shard, no .part
    # Training's dataset with data.shard_cache gives what the ranged reads give.
    pre = presets.Preprocessing.from_config(DataConfig(image_size=32))
    split = data.make_split(TAR, 0.2, seed=0)
    cached = data.DecodedImages(split, TAR, CLASSES[:3], pre.resize_size, shard_cache=str(tmp_path / "c2"))
    ranged = data.DecodedImages(split, TAR, CLASSES[:3], pre.resize_size)
    assert all(torch.equal(cached[i][0], ranged[i][0]) for i in range(len(split)))


def test_the_shipped_weights_score_the_same_from_s3_shards_as_from_local_files(s3_data, tmp_path: Path) -> None:
    """A model that has learned (the metrics are not those of a constant prediction) sees the same images."""
    tmp = s3_data[0]
    weights = Path(__file__).resolve().parents[1] / "weights" / "fashion_mnist_mobilenet_v3_small.pt"
    options = {"model": weights, "split": "test", "num_workers": 0, "bootstrap_resamples": 50,
               "baseline_simulations": 50}
    remote = evaluate.run(evaluate.EvaluateOptions(data=TAR, out=tmp_path / "s3", **options))
    local = evaluate.run(evaluate.EvaluateOptions(data=tmp / "local", out=tmp_path / "local", **options))
    assert remote["accuracy"] > 0.5  # far above the 1/3 of a constant answer on 3 balanced classes
    for key in ("n_images", "f1_macro", "accuracy", "log_loss", "confusion_matrix"):
        assert remote[key] == local[key], key
