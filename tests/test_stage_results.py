"""Stage results are frozen and say what they are: the line the CLI prints comes from `summary()`
(issue 21 item 2, for export and train so far)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from imgclf.export import ExportResult, QuantizeReport
from imgclf.train import TrainResult


def test_export_summary_is_the_cli_lines() -> None:
    plain = ExportResult(Path("r/model.onnx"), "onnx", "torch.onnx dynamo", 3.2e-7)
    assert plain.summary() == ("wrote r/model.onnx (onnx, torch.onnx dynamo); max |exported - torch| probability "
                               "on a probe batch: 3.20e-07")
    q = QuantizeReport("static QDQ", 256, "D split test, 2,000 images", 0.995, 0.9, 0.8975)
    lines = dataclasses.replace(plain, quantization=q).summary().splitlines()
    assert lines[0].endswith("3.20e-07 (fp32, before quantisation)")
    assert lines[1] == "quantised: static QDQ; 256 calibration images; held out: D split test, 2,000 images"
    assert lines[2] == "int8 vs fp32: top-1 agreement 99.50%; F1-macro 0.9000 -> 0.8975 (-0.25 points)"
    no_held_out = dataclasses.replace(q, top1_agreement=None, f1_fp32=None, f1_int8=None)
    assert len(dataclasses.replace(plain, quantization=no_held_out).summary().splitlines()) == 2


def test_train_result_is_frozen_with_a_summary() -> None:
    result = TrainResult(Path("runs/r1"), Path("runs/r1/checkpoints/best.ckpt"), Path("runs/r1/checkpoints/last.ckpt"),
                         ["a", "b"], 0.91234, 3, 12.4)
    assert result.summary() == "trained 3 epoch(s) in 12s; best score 0.9123 -> runs/r1/checkpoints/best.ckpt"
    assert "best score n/a" in dataclasses.replace(result, best_score=None).summary()
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.epochs_run = 4  # type: ignore[misc]
