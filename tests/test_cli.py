"""The CLI's surface: help lists every stage, user errors are one line with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imgclf.cli import STAGES, main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgclf", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_stage() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for stage in STAGES:
        assert stage in proc.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_help(stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([stage, "--help"])
    assert exc.value.code == 0
    assert f"imgclf {stage}" in capsys.readouterr().out


def test_shared_options_are_spelled_the_same(capsys: pytest.CaptureFixture[str]) -> None:
    for stage, option in [("download", "--out"), ("train", "--out"), ("train", "--config"), ("train", "--data"),
                          ("train", "--seed"), ("evaluate", "--data"), ("evaluate", "--seed"), ("demo", "--out"),
                          ("demo", "--seed")]:
        with pytest.raises(SystemExit):
            main([stage, "--help"])
        assert option in capsys.readouterr().out, (stage, option)


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "download" in capsys.readouterr().out


def test_missing_manifest_is_one_line_error(tmp_path: Path) -> None:
    proc = run_cli("train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "manifest" in lines[0] and "nowhere" in lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_source_file_is_one_line_error(tmp_path: Path) -> None:
    proc = run_cli("download", str(tmp_path / "urls.csv"), "--out", str(tmp_path / "data"))
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0
    assert "urls.csv" in proc.stderr


def test_path_mistakes_get_their_own_diagnosis(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in --data or in the model is named as such, before anything else is asked for."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "missing_dir", "--out", "r"]) == 2
    err = capsys.readouterr().err
    assert "missing_dir: no such data directory" in err and "run `imgclf download" not in err
    assert not (tmp_path / "r").exists()
    assert main(["evaluate", "--model", "runs/typo"]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith(")") and "runs/typo: no such model" in err and "--data" not in err
    import imgclf
    from imgclf.errors import DataError

    with pytest.raises(DataError, match="runs/typo: no such model"):
        imgclf.evaluate("runs/typo")


def test_ctrl_c_in_train_says_how_to_resume_and_a_rerun_says_interrupted(tiny_data_dir: Path, tmp_path: Path) -> None:
    import json
    import os
    import signal
    import time

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "imgclf", "train", "--data", str(tiny_data_dir), "--out", str(run_dir),
            "trainer.epochs=30", "trainer.batch_size=16", "data.image_size=32", "data.num_workers=0",
            "model.arch=mobilenet_v3_small"]
    env = {**os.environ, "IMGCLF_NO_BARS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not last.is_file():
        time.sleep(0.2)
    assert proc.poll() is None, f"training ended before Ctrl-C: {proc.stderr.read()[-500:]!r}"
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    final = stderr.strip().splitlines()[-1]
    assert proc.returncode == 130 and final.startswith("imgclf train: interrupted; "), stderr[-1500:]
    assert "stopped after epoch" in final and "--resume" in final
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "holds an interrupted run; continue it with --resume" in again.stderr
    assert "already holds a trained run" not in again.stderr


def test_predict_reads_the_table_download_read_and_passes_its_columns_through(tiny_run: Path,
                                                                                tmp_path: Path) -> None:
    import csv
    import json

    from helpers import demo_images

    rows = [("Bag", "test", demo_images("test", "Bag", 1)[0]), ("Coat", "test", demo_images("test", "Coat", 1)[0])]
    table = tmp_path / "list.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label", "split", "status"])
        writer.writerows([(str(path), label, split, "checked") for label, split, path in rows])
    args = [str(table), "--path-col", "file"]
    assert main(["download", *args, "--out", str(tmp_path / "data"), "--no-progress"]) == 0  # download reads it
    assert main(["predict", *args, "--model", str(tiny_run), "-o", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    with open(tmp_path / "p.csv", newline="") as fh:
        out = list(csv.DictReader(fh))
    assert [r["input"] for r in out] == [str(path) for _, _, path in rows]
    assert [(r["label"], r["split"], r["input_status"], r["status"]) for r in out] == [
        ("Bag", "test", "checked", "ok"), ("Coat", "test", "checked", "ok")]
    assert main(["predict", *args, "--model", str(tiny_run), "-o", str(tmp_path / "p.jsonl"), "--no-progress"]) == 0
    first = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert first["columns"] == {"label": "Bag", "split": "test", "status": "checked"} and first["status"] == "ok"
    assert main(["predict", str(table), "--model", str(tiny_run), "--url-col", "link", "--no-progress"]) == 2


def test_a_label_the_model_does_not_know_is_listed_with_the_models_own_names(
        tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import TINY_CLASSES
    from helpers import CLASSES, make_data_dir

    other = next(c for c in CLASSES if c not in TINY_CLASSES)
    data = make_data_dir(tmp_path / "d", [*TINY_CLASSES[:2], other], n_train=2, n_test=2)
    assert main(["evaluate", "--model", str(tiny_run), "--data", str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"labels not known to the model: {other!r}" in err
    assert "the model's 3 classes: " + ", ".join(map(repr, TINY_CLASSES)) in err
