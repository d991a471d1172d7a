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
