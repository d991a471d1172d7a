"""`train --data FOLDER`: an image folder or archive is ingested by download's own code, beside the run.

Real bundled Fashion-MNIST PNGs in a `train/label/`, `test/label/` tree, real training (1 epoch, 32 px).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_CLASSES, tiny_config
from helpers import demo_images

from imgclf import pipeline as _ingest
from imgclf.errors import DataError
from imgclf.manifest import read_manifest
from imgclf.stages import train

TINY = ["trainer.epochs=1", "trainer.batch_size=16", "data.image_size=32", "data.num_workers=0",
        "trainer.progress_bar=false", "model.arch=resnet18"]


def _photo_folder(root: Path, n_train: int = 8, n_test: int = 3) -> Path:
    for split, n in (("train", n_train), ("test", n_test)):
        for label in TINY_CLASSES:
            (root / split / label).mkdir(parents=True)
            for src in demo_images(split, label, n):
                shutil.copyfile(src, root / split / label / src.name)
    return root


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_train_on_an_image_folder_ingests_it_beside_the_run_and_reuses_it(tmp_path: Path) -> None:
    photos = _photo_folder(tmp_path / "photos")
    before = _tree_digest(photos)
    run_dir = tmp_path / "runs" / "r1"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "imgclf", "train", "--data", str(photos), "--out", str(run_dir),
                           *TINY], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data_dir = tmp_path / "runs" / "r1_data"
    lines = [line for line in proc.stderr.splitlines() if "made the data directory" in line]
    assert len(lines) == 1, proc.stderr[-2000:]  # one line: what, where, how many
    assert f"{data_dir} (33 rows, 33 ok; test 9 train 24;" in lines[0]
    assert _tree_digest(photos) == before  # nothing written into the source folder

    manifest = read_manifest(data_dir)
    assert (manifest["status"] == "ok").sum() == 33
    info = json.loads((run_dir / "run.json").read_text())
    assert Path(info["data_dir"]).resolve() == data_dir.resolve()
    assert info["status"] == "done"
    # The folder's own test/ images never reach training or validation.
    split = pd.read_csv(run_dir / "split.csv")
    test_paths = set(manifest.loc[manifest["split"] == "test", "path"])
    assert len(split) == 24 and not test_paths & set(split["path"])

    # A rerun (here --resume for one more epoch) reuses the data directory and reads only the new file.
    extra = demo_images("train", TINY_CLASSES[0], 9)[-1]
    shutil.copyfile(extra, photos / "train" / TINY_CLASSES[0] / extra.name)
    data = _ingest.data_for_training(photos, run_dir)  # what `imgclf train` and imgclf.train do first
    result = train.run(train.TrainOptions(tiny_config("trainer.epochs=2"), data, run_dir, resume=True))
    assert result.epochs_run == 2
    assert len(read_manifest(data_dir)) == 34
    assert not (tmp_path / "runs" / "r1_data_data").exists()


def test_an_archive_is_ingested_and_an_out_inside_the_source_is_refused(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    photos = _photo_folder(tmp_path / "photos", n_train=2, n_test=1)
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(photos, arcname="photos")
    assert _ingest.is_image_source(archive) and _ingest.is_image_source(photos)
    caplog.set_level("INFO", logger="imgclf.train")
    data_dir = _ingest.ingest(archive, tmp_path / "runs" / "a")
    assert data_dir == tmp_path / "runs" / "a_data"
    assert (read_manifest(data_dir)["status"] == "ok").sum() == 9
    assert any("image archive" in r.getMessage() and "9 ok" in r.getMessage() for r in caplog.records)
    assert not _ingest.is_image_source(data_dir)  # a data directory is used as it is
    assert _ingest.data_dir_for(Path("runs/r1/")) == Path("runs/r1_data")
    assert _ingest.data_dir_for(Path(".")) == Path.cwd().parent / f"{Path.cwd().name}_data"  # `--out .`

    before = _tree_digest(photos)
    with pytest.raises(DataError, match="inside the source folder"):
        _ingest.data_for_training(photos, photos / "run")
    assert _tree_digest(photos) == before
