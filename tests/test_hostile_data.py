"""Hostile data directories, labels and configs against train, evaluate and download (issue 10: classes 1, 4, 5, 6).

One data directory holds everything at once: class names that are markup or formulas
(`$\\frac{$`, `=1+1`, `-2+3`), and stored images that went bad (a truncated file, manifest paths
that are absolute, climb out with `..` or leave through a symlink, a 1 x 60,000 strip). A run
trains on it, skipping and counting the bad images; evaluate scores it and writes every plot and CSV.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_config
from helpers import CLASSES, make_data_dir
from hostile import CONTROL_LABELS, extreme_aspect_png, truncated, yaml_alias_bomb, yaml_override_bomb

from imgclf import data, presets
from imgclf.config import DataConfig
from imgclf.errors import DataError
from imgclf.manifest import read_manifest, write_manifest
from imgclf.untrusted import csv_uncell

LABELS = {CLASSES[0]: r"$\frac{$", CLASSES[1]: "=1+1", CLASSES[2]: "-2+3"}
BAD_TRAIN_ROWS = 5


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgclf", *args], capture_output=True, text=True, timeout=timeout)


def _add_rows(data_dir: Path, outside: Path) -> None:
    """Rows whose stored image went bad or whose path leaves DATA_DIR (all status ok in the manifest)."""
    manifest = read_manifest(data_dir)
    good = manifest.iloc[0]
    image = (data_dir / good["path"]).read_bytes()
    (data_dir / "images" / "bad").mkdir()
    (data_dir / "images" / "bad" / "cut.png").write_bytes(truncated(image))
    (data_dir / "images" / "bad" / "strip.png").write_bytes(extreme_aspect_png(1, 60_000))
    outside.write_bytes(image)
    (data_dir / "images" / "bad" / "link.png").symlink_to(outside)
    (data_dir / "images" / "bad" / "cut_test.png").write_bytes(truncated(image))
    paths = [("images/bad/cut.png", "train"), (str(outside), "train"), (f"../{outside.name}", "train"),
             ("images/bad/link.png", "train"), ("images/bad/strip.png", "train"), ("images/bad/cut_test.png", "test"),
             ("images/bad/strip.png", "test")]
    extra = [{**good.to_dict(), "row": len(manifest) + i, "path": path, "split": split, "url": f"http://x.invalid/{i}"}
             for i, (path, split) in enumerate(paths)]
    write_manifest(pd.concat([manifest, pd.DataFrame(extra)], ignore_index=True), data_dir)


@pytest.fixture(scope="module")
def hostile_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    data_dir = make_data_dir(root / "data", CLASSES[:3], n_train=20, n_test=14)
    manifest = read_manifest(data_dir)
    write_manifest(manifest.assign(label=manifest["label"].map(LABELS)), data_dir)
    _add_rows(data_dir, root / "outside.png")
    return data_dir


@pytest.fixture(scope="module")
def hostile_run(hostile_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from imgclf.stages import train

    run_dir = tmp_path_factory.mktemp("runs") / "hostile"
    train.run(train.TrainOptions(tiny_config("trainer.epochs=1", "data.max_unreadable=0.1"), hostile_data, run_dir))
    return run_dir


# ---------------------------------------------------------------- class 6: stored data that went bad


def test_training_skips_and_counts_unreadable_and_escaping_images(hostile_run: Path) -> None:
    info = json.loads((hostile_run / "run.json").read_text())
    assert info["status"] == "done" and info["unreadable_images"] == BAD_TRAIN_ROWS
    assert sorted(info["class_names"]) == sorted(LABELS.values())


def test_too_many_unreadable_images_stop_with_one_line_and_leave_no_run_dir(hostile_data: Path,
                                                                           tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _cli("train", "--data", str(hostile_data), "--out", str(run_dir), "trainer.epochs=1",
                  "data.image_size=32", "data.num_workers=0", "model.arch=resnet18", "data.max_unreadable=0.01")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"{BAD_TRAIN_ROWS} of" in result.stderr and "data.max_unreadable=0.01" in result.stderr
    assert not run_dir.exists()  # no config.yaml/split.csv left behind


def test_without_the_cache_the_guard_stops_mid_epoch_and_cleans_up(hostile_data: Path, tmp_path: Path) -> None:
    from imgclf.stages import train

    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match="unreadable"):
        train.run(train.TrainOptions(tiny_config("trainer.epochs=1", "data.cache=false", "data.max_unreadable=0.01"),
                                     hostile_data, run_dir))
    assert not run_dir.exists()


def test_loader_workers_report_unreadable_rows_to_the_main_process(hostile_data: Path) -> None:
    frame = read_manifest(hostile_data).query("split == 'train'")
    pre = presets.Preprocessing.from_config(DataConfig(image_size=32))
    images = data.DecodedImages(frame, hostile_data, sorted(LABELS.values()), pre.resize_size, presets.eval_resize(pre))
    loader = torch.utils.data.DataLoader(images, batch_size=16, num_workers=2)
    assert sum(len(targets) for _, targets in loader) == len(frame)  # stand-ins keep every batch full
    assert images.failures.count() == BAD_TRAIN_ROWS


def test_the_decoder_refuses_an_image_whose_eval_resize_would_be_huge(tmp_path: Path) -> None:
    strip = tmp_path / "strip.png"
    strip.write_bytes(extreme_aspect_png(1, 60_000))
    started = time.monotonic()
    with pytest.raises(ValueError, match="too_large"):
        data.decode_resized(strip, 73)
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- class 4: labels are data


def test_evaluate_draws_and_writes_markup_and_formula_labels_as_data(hostile_run: Path) -> None:
    from imgclf.stages import evaluate

    metrics = evaluate.run(evaluate.EvaluateOptions(model=hostile_run, bootstrap_resamples=50,
                                                    baseline_simulations=50))
    # The truncated test image, and the strip whose eval resize would be huge, are left out and counted.
    assert metrics["unreadable_images"] == 2 and metrics["n_images"] == 42
    assert sorted(metrics["class_names"]) == sorted(LABELS.values())  # raw in JSON
    for name in ("confusion_matrix.png", "per_class_f1.png", "most_confused.png", "report.html", "metrics.json"):
        assert (hostile_run / name).stat().st_size > 0, name
    preds = pd.read_csv(hostile_run / "predictions.csv", dtype=str, keep_default_na=False)
    assert set(preds["true"]) == {r"$\frac{$", "'=1+1", "'-2+3"}  # no cell starts like a formula
    assert set(preds["true"].map(csv_uncell)) == set(LABELS.values())
    report = pd.read_csv(hostile_run / "classification_report.csv", dtype=str, keep_default_na=False)
    assert {"'=1+1", "'-2+3"} <= set(report["class"])
    html = (hostile_run / "report.html").read_text()
    assert "/etc/" not in html and "outside.png" not in html


def test_split_csv_keeps_labels_exact_through_the_spreadsheet_escape(tmp_path: Path) -> None:
    split = pd.DataFrame({"row": [0, 1, 2], "path": ["a", "b", "c"], "label": ["=1+1", "'x", "@y"],
                          "subset": ["train", "val", "train"]})
    data.write_split(split, tmp_path)
    text = (tmp_path / "split.csv").read_text()
    assert "'=1+1" in text and "''x" in text and "'@y" in text
    assert data.read_split(tmp_path)["label"].tolist() == ["=1+1", "'x", "@y"]


@pytest.mark.parametrize("label", CONTROL_LABELS)
def test_a_label_with_a_control_character_is_refused_naming_the_row(tmp_path: Path, label: str) -> None:
    data_dir = make_data_dir(tmp_path / "d", CLASSES[:2], n_train=2, n_test=0)
    manifest = read_manifest(data_dir)
    manifest.loc[3, "label"] = label
    write_manifest(manifest, data_dir)
    with pytest.raises(DataError, match=r"row 3: label .* control character"):
        read_manifest(data_dir)
    table = tmp_path / "urls.csv"
    pd.DataFrame({"url": ["http://x.invalid/a.png", "http://x.invalid/b.png"], "label": ["ok", label]}).to_csv(
        table, index=False)
    result = _cli("download", str(table), "--out", str(tmp_path / "out"), "--no-progress")
    assert result.returncode == 2 and "data row 2" in result.stderr and "control character" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- class 5: config parsing


@pytest.mark.parametrize("how", ["file", "override", "recursive", "deep"])
def test_yaml_bombs_are_one_short_line_in_seconds(tmp_path: Path, how: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text({"file": yaml_alias_bomb(), "recursive": "seed: &a [*a]\n",
                       "deep": "seed: " + "[" * 5000 + "]" * 5000 + "\n"}.get(how, "seed: 1\n"))
    extra = [f"seed={yaml_override_bomb()}"] if how == "override" else []
    started = time.monotonic()
    result = _cli("train", "--config", str(config), "--data", str(tmp_path), "--out", str(tmp_path / "r"), *extra,
                  timeout=120)
    assert time.monotonic() - started < 60
    assert result.returncode == 2 and "refused" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr) < 400 and "Traceback" not in result.stderr


def test_a_huge_value_in_a_bad_override_gives_a_bounded_line(tmp_path: Path) -> None:
    from imgclf.config import load_config
    from imgclf.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config(None, ["trainer.epochs=" + "[" + "1," * 20_000 + "1]"])
    assert len(str(caught.value)) < 400


def test_manifest_files_shared_by_someone_else_cannot_point_outside(hostile_data: Path, tmp_path: Path) -> None:
    """The report gallery and the loaders read through the same confined reader (storage.read_bytes)."""
    from imgclf import storage

    for rel in ("/etc/hostname", "../outside.png", "images/bad/link.png"):
        with pytest.raises((DataError, OSError)):
            storage.read_bytes(hostile_data, rel)
    shutil.copy(hostile_data / read_manifest(hostile_data).iloc[0]["path"], tmp_path / "ok.png")
    assert storage.read_bytes(tmp_path, "ok.png")[:4] == b"\x89PNG"
