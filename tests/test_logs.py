"""Output a person can read in a log: no bars outside a terminal, one line per epoch, MLflow offline."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from imgclf import progress

ANSI = re.compile(r"\x1b\[")


def test_piped_demo_is_small_and_every_line_readable(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    with log.open("wb") as sink:  # a file, not a terminal: what CI and `| tee` see
        proc = subprocess.run([sys.executable, "-m", "imgclf", "demo", "--out", str(tmp_path / "demo"), "--limit",
                               "6", "trainer.epochs=2", "model.arch=resnet18", "data.image_size=32"],
                              stdout=sink, stderr=subprocess.STDOUT, timeout=900)
    text = log.read_text(encoding="utf-8")
    assert proc.returncode == 0, text[-2000:]
    assert "\r" not in text and not ANSI.search(text), "a progress bar leaked into the log"
    assert len(text.encode()) < 20_000
    assert max(len(line) for line in text.splitlines()) < 300
    epochs = [line for line in text.splitlines() if re.search(r"epoch \d+/2: train loss [\d.]+, val loss", line)]
    assert len(epochs) == 2, text
    assert "images/s" in epochs[-1] and "val F1-macro" in epochs[-1]
    for stage in ("== download", "== train", "== evaluate", "== demo summary"):
        assert stage in text


def test_track_logs_throttled_lines_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(progress, "interactive", lambda: False)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="imgclf")
    batches = [list(range(10))] * 5
    assert list(progress.track(batches, "predict", total=50, size=len)) == batches
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("predict: 50 images in ") and lines[-1].endswith("images/s)")
    caplog.clear()
    list(progress.track(batches, "predict", total=50, enabled=False))
    assert not caplog.records


def test_mlflow_run_is_written_offline(tmp_path: Path, tiny_data_dir: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from imgclf.stages import train

    run_dir = tmp_path / "run"
    train.run(train.TrainOptions(tiny_config("trainer.epochs=1", "trainer.logger=mlflow"), tiny_data_dir, run_dir))
    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("imgclf")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "run" and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert 0.0 <= metrics["val_f1_macro"] <= 1.0 and "val_loss" in metrics
    assert runs[0].data.params["model/arch"] == "resnet18"
