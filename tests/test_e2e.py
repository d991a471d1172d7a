"""End to end on a tiny real subset: local HTTP server -> download -> train 1 epoch -> evaluate.

Runs the real CLI in subprocesses, exactly as a user would, and checks the contracts
between stages (manifest, run directory, metrics.json).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from imgclf import demo
from imgclf._localserver import LocalServer

TINY = ["trainer.epochs=1", "data.image_size=32", "data.num_workers=0", "trainer.batch_size=32",
        "trainer.progress_bar=false"]


def imgclf(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "imgclf", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"imgclf {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def check_metrics(metrics: dict, n_classes: int) -> None:
    for key in ("f1_macro", "accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    weighted = metrics["baselines"]["weighted_random"]
    assert weighted["accuracy"] == pytest.approx(1 / n_classes, abs=0.02)  # balanced sample
    assert 0.0 <= weighted["f1_macro"] <= 1.0


@pytest.mark.slow
def test_stages_through_the_cli(tmp_path: Path) -> None:
    with LocalServer(demo.SAMPLE_ROOT) as server:
        train_csv, test_csv = demo.write_sources(server.base_url, tmp_path / "sources", limit=6)
        imgclf("download", str(train_csv), str(test_csv), "--out", str(tmp_path / "data"), "--no-progress")

    manifest = pd.read_parquet(tmp_path / "data" / "manifest.parquet")
    assert len(manifest) == 10 * 6 * 2 + len(demo.BROKEN_LINKS)  # one row per input row
    assert (manifest["status"] == "ok").sum() == 120
    broken = manifest.set_index(manifest["url"].str.rsplit("/", n=1).str[-1])["status"]
    assert broken["product_4711.png"] == "http_error"
    assert broken["removed.html"] == "not_image"
    assert broken["truncated.png"] == "not_image"
    assert set(manifest.loc[manifest["status"] == "ok", "split"]) == {"train", "test"}
    for rel in manifest.loc[manifest["status"] == "ok", "path"]:
        assert (tmp_path / "data" / rel).is_file()
    report = json.loads((tmp_path / "data" / "download_report.json").read_text())
    assert report["counts"]["ok"] == 120 if "counts" in report else report["ok"] == 120

    run_dir = tmp_path / "run"
    imgclf("train", "--data", str(tmp_path / "data"), "--out", str(run_dir), *TINY)
    for name in ("config.yaml", "split.csv", "metrics.csv", "curves.png", "checkpoints/best.ckpt",
                 "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    assert len(pd.read_csv(run_dir / "metrics.csv")) == 1

    imgclf("evaluate", "--model", str(run_dir), "--data", str(tmp_path / "data"), "--split", "test")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    check_metrics(metrics, n_classes=10)
    assert (run_dir / "confusion_matrix.png").is_file()


@pytest.mark.slow
def test_demo_quick_look(tmp_path: Path) -> None:
    # No trainer.progress_bar override here: --no-progress alone must silence every bar.
    quick = [o for o in TINY if not o.startswith("trainer.progress_bar")]
    proc = imgclf("demo", "--out", str(tmp_path / "demo"), "--limit", "5", "--no-progress", *quick)
    assert "DataLoader" not in proc.stdout + proc.stderr
    out = proc.stdout
    assert "F1" in out or "f1" in out
    assert "weighted" in out.lower()
    run_dir = tmp_path / "demo" / "run"
    assert str(run_dir) in out
    for name in ("report.html", "confusion_matrix.png", "metrics.json", "curves.png"):
        assert str(run_dir / name) in out, name  # every path the summary names exists
        assert (run_dir / name).is_file(), name
    check_metrics(json.loads((run_dir / "metrics.json").read_text()), n_classes=10)
    # A second demo keeps the first run and writes a new one.
    imgclf("demo", "--out", str(tmp_path / "demo"), "--limit", "5", "--no-progress", *TINY)
    assert (tmp_path / "demo" / "run-2" / "metrics.json").is_file()
    assert (run_dir / "metrics.json").is_file()
