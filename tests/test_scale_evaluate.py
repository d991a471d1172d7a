"""Evaluate on a manifest written as parts (issue 25 item 2; imgclf.evaluate._scale): the same
figures as on the single-file manifest of the same data, the run's validation rows by its recorded
hash rule, and the bound on the evaluated split with its seeded --sample way out. Real tiny
training and real evaluation of bundled Fashion-MNIST PNGs (seconds)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_CLASSES, tiny_config
from helpers import make_data_dir
from test_scale_stream import to_parts

from imgclf import hashsplit
from imgclf.errors import DataError
from imgclf.evaluate import _scale
from imgclf.stages import evaluate, train

FAST = dict(bootstrap_resamples=200, baseline_simulations=50, num_workers=0, progress=False, gallery_size=4)


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pd.DataFrame, Path]:
    """(single-file DATA_DIR, the same data as parts, its frame, a run trained on the parts)."""
    tmp = tmp_path_factory.mktemp("ev")
    single = make_data_dir(tmp / "single", TINY_CLASSES, n_train=24, n_test=10)
    shutil.copytree(single, tmp / "parts")
    frame = to_parts(tmp / "parts", 11)
    train.run(train.TrainOptions(tiny_config("trainer.epochs=1"), tmp / "parts", tmp / "run"))
    return single, tmp / "parts", frame, tmp / "run"


def _evaluate(tmp_path: Path, name: str, **kw) -> dict:
    return evaluate.run(evaluate.EvaluateOptions(out=tmp_path / name, **FAST, **kw))


def test_parts_give_the_figures_of_the_single_file_manifest(both, tmp_path: Path) -> None:
    single, parts, frame, run = both
    model = run / "checkpoints" / "best.ckpt"
    want = _evaluate(tmp_path, "single", model=model, data=single)
    got = _evaluate(tmp_path, "parts", model=model, data=parts)
    assert got["n_images"] == 30 and got["split_source"] == "manifest"
    for key in ("accuracy", "f1_macro", "accuracy_ci95", "f1_macro_ci95", "baselines", "train_shares_source",
                "confusion_matrix"):
        assert got[key] == want[key], key
    assert got["data"] == want["data"]  # counts and leakage from streaming passes, not a frame
    pred = pd.read_csv(tmp_path / "parts" / "predictions.csv")
    assert sorted(pred["row"]) == sorted(frame.loc[frame["split"] == "test", "row"])


def test_the_run_validation_rows_come_from_its_recorded_rule(both, tmp_path: Path) -> None:
    _, parts, frame, run = both
    rule = hashsplit.ValRule.from_json(json.loads((run / "run.json").read_text())["split_rule"], "run.json")
    pool = frame[frame["split"] == "train"]
    want = set(pool.loc[rule.is_val(pool["sha256"].tolist()), "row"])
    metrics = _evaluate(tmp_path, "val", model=run, split="val")
    assert metrics["split"] == "val" and metrics["split_source"].startswith("run split_rule")
    assert set(pd.read_csv(tmp_path / "val" / "predictions.csv")["row"]) == want
    assert metrics["train_shares_source"] == "run split_rule (train side)"


def test_a_split_over_the_bound_is_refused_in_one_line_and_sampled_on_request(both, tmp_path: Path,
                                                                               monkeypatch) -> None:
    _, parts, frame, run = both
    monkeypatch.setattr(_scale, "MAX_IMAGES", 10)
    with pytest.raises(DataError, match=r"split 'test' has 30 usable images, more than evaluate holds.*--sample 10"):
        _evaluate(tmp_path, "refused", model=run)
    assert not (tmp_path / "refused").exists()
    metrics = _evaluate(tmp_path, "sampled", model=run, sample=12, seed=3)
    test = frame[frame["split"] == "test"]
    want = set(test.loc[hashsplit.ValRule(3, 12 / 30).is_val(test["sha256"].tolist()), "row"])
    assert set(pd.read_csv(tmp_path / "sampled" / "predictions.csv")["row"]) == want
    assert metrics["n_images"] == len(want) and 0 < len(want) < 30


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgclf", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_cli_samples_and_refuses_in_one_line(both, tmp_path: Path) -> None:
    _, parts, frame, run = both
    done = _cli("evaluate", str(run), "--sample", "12", "--seed", "3", "--out", str(tmp_path / "ev"), "--no-progress")
    assert done.returncode == 0, done.stderr
    test = frame[frame["split"] == "test"]
    want = set(test.loc[hashsplit.ValRule(3, 12 / 30).is_val(test["sha256"].tolist()), "row"])
    assert set(pd.read_csv(tmp_path / "ev" / "predictions.csv")["row"]) == want
    refused = _cli("audit", "--data", str(parts), "--out", str(tmp_path / "au"), "--apply")
    assert refused.returncode == 2 and not (tmp_path / "au").exists()
    # faiss's loader writes its own notes first (INFO lines, its ModuleNotFoundError repr); then our one line
    assert "Traceback" not in refused.stderr
    assert "written as parts; --apply" in refused.stderr.strip().splitlines()[-1]
