"""task: multilabel through the CLI, on composites of real images (tests/ml_composites.py):

    imgclf download train.csv test.csv --label-sep '|' --out D
    imgclf train --config ml.yaml --data D --out R
    imgclf evaluate --model R --data D

A real tiny training (seconds) that must beat the frequency baseline; the checkpoint carries the
task and one threshold per label; evaluate writes the multi-label figures and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from ml_composites import LABELS, make_corpus, write_table

from imgclf import checkpoint

CONFIG = """\
task: multilabel
seed: 0
model: {arch: resnet18}
data:
  image_size: 32
  num_workers: 0
  val_fraction: 0.2
  augment: {crop_scale: [0.8, 1.0]}
optim: {lr: 0.003}
trainer: {epochs: 4, batch_size: 16, progress_bar: false, monitor: val_map}
"""


def _imgclf(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "imgclf", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"imgclf {args[0]}: {done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ml")
    train = write_table(root, make_corpus(root, 128, "train", seed=0), "train.csv")
    test = write_table(root, make_corpus(root, 48, "test", seed=1), "test.csv")
    data, run = root / "D", root / "R"
    (root / "ml.yaml").write_text(CONFIG)
    _imgclf("download", str(train), str(test), "--label-sep", "|", "--out", str(data), "--no-progress")
    _imgclf("train", "--config", str(root / "ml.yaml"), "--data", str(data), "--out", str(run))
    summary = _imgclf("evaluate", "--model", str(run), "--data", str(data), "--no-progress").stdout
    return {"data": data, "run": run, "summary": summary,
            "metrics": json.loads((run / "metrics.json").read_text())}


def test_checkpoint_carries_task_and_thresholds(evaluated):
    ckpt = torch.load(evaluated["run"] / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    meta = ckpt["imgclf"]
    assert meta["task"] == "multilabel" and meta["class_names"] == LABELS
    assert len(meta["thresholds"]) == 3 and all(0.0 <= t <= 1.0 for t in meta["thresholds"])
    loaded = checkpoint.load_model(evaluated["run"])
    assert loaded.task == "multilabel" and loaded.thresholds == meta["thresholds"]
    split = pd.read_csv(evaluated["run"] / "split.csv", keep_default_na=False)
    assert set(split["subset"]) == {"train", "val"}
    val_labels = "|".join(split.loc[split["subset"] == "val", "label"])
    assert all(label in val_labels for label in LABELS)  # stratified: every label is validated
    history = pd.read_csv(evaluated["run"] / "metrics.csv")
    assert "val_map" in history.columns and len(history) == 4


def test_evaluate_beats_the_frequency_baseline_with_intervals(evaluated):
    m = evaluated["metrics"]
    assert m["task"] == "multilabel" and m["n_images"] == 48 and m["class_names"] == LABELS
    base = m["baselines"]["frequency"]
    assert m["f1_macro"] > base["f1_macro"] + 0.1
    assert m["map"] > base["map"] + 0.1
    assert m["vs_frequency"]["clearly_above"] is True
    for key in ("f1_micro", "f1_macro", "map", "subset_accuracy", "hamming_loss"):
        lo, hi = m[f"{key}_ci95"]
        assert lo <= m[key] <= hi, key
    for name in LABELS:
        row = m["per_label"][name]
        assert {"precision", "recall", "f1", "ap", "f1_ci95", "ap_ci95", "threshold", "support"} <= set(row)
    assert m["images_without_labels"] >= 1  # the corpus has empty composites, kept by --label-sep
    assert len(m["cooccurrence"]) == 3 and set(m["worst_labels"]) <= set(LABELS)
    assert "mAP" in evaluated["summary"] and "frequency baseline" in evaluated["summary"]


def test_evaluate_files(evaluated):
    run = evaluated["run"]
    preds = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    assert list(preds.columns) == ["row", "path", "url", "true", "predicted", "exact_match", "errors", "top_k"]
    assert preds["exact_match"].mean() == pytest.approx(evaluated["metrics"]["subset_accuracy"])
    html = (run / "report.html").read_text()
    assert "Label co-occurrence" in html and "Worst labels" in html and "<script" not in html
    report = pd.read_csv(run / "classification_report.csv")
    assert report["label"].tolist() == LABELS
