"""One stage contract (issue 21 item 2): every stage is `run(options) -> result`, with one frozen options
object holding its inputs, and a frozen result whose `summary()` is what the CLI prints."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path

import pytest

from imgclf import stages
from imgclf.export import ExportResult, QuantizeReport
from imgclf.train import TrainResult

# stage -> (options class, result class), by name in the stage package
CONTRACT = {
    "download": ("DownloadOptions", "DownloadResult"),
    "audit": ("AuditOptions", "AuditResult"),
    "train": ("TrainOptions", "TrainResult"),
    "evaluate": ("EvaluateOptions", "EvaluateResult"),
    "predict": ("PredictOptions", "PredictResult"),
    "export": ("ExportOptions", "ExportResult"),
    "serve": ("ServeOptions", "ServeResult"),
}


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_every_stage_is_run_of_one_options_object_to_a_frozen_result(name: str) -> None:
    stage = getattr(stages, name)
    options_name, result_name = CONTRACT[name]
    options, result = getattr(stage, options_name), getattr(stage, result_name)
    hints = typing.get_type_hints(stage.run)
    params = list(inspect.signature(stage.run).parameters.values())
    assert len(params) == 1, f"{name}.run takes {[p.name for p in params]}"
    assert hints[params[0].name] is options
    assert hints["return"] is result
    for cls in (options, result):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, f"{cls.__name__} is not frozen"
    assert callable(result.summary)
    # One name per thing: the model is `model`, the data directory `data`, what is written `out`.
    fields = {f.name for f in dataclasses.fields(options)}
    assert not fields & {"run_dir", "weights", "data_dir", "out_dir", "model_path", "output"}, fields
    assert name in ("download", "train", "evaluate", "audit") or "model" in fields


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
                         ["a", "b"], 0.91234, 3, 12.4, "val_f1_macro")
    assert result.summary() == ("trained 3 epoch(s) in 12s; best val_f1_macro = 0.9123 -> "
                                "runs/r1/checkpoints/best.ckpt")
    assert "best val_f1_macro = n/a" in dataclasses.replace(result, best_score=None).summary()
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.epochs_run = 4  # type: ignore[misc]


def test_options_hold_the_inputs_and_check_them_once() -> None:
    from imgclf.errors import ConfigError

    download = stages.download.DownloadOptions(sources=["a.csv", Path("b")], out="data")
    assert download.sources == (Path("a.csv"), Path("b")) and download.out == "data"
    predict = stages.predict.PredictOptions(model="m.onnx", inputs="one.jpg", out="p.csv")
    assert predict.inputs == ("one.jpg",) and predict.out == Path("p.csv")
    with pytest.raises(ConfigError, match="two judges"):
        stages.audit.AuditOptions(data=Path("d"), out=Path("a"), model=Path("m.pt"), backbone="timm/resnet18")
    with pytest.raises(ConfigError, match="--folds 1"):
        stages.audit.AuditOptions(data=Path("d"), out=Path("a"), folds=1)
    with pytest.raises(ConfigError, match="--apply rewrites the manifest"):
        stages.audit.AuditOptions(data="s3://bucket/d", out=Path("a"), apply=True)


def test_audit_and_evaluate_results_read_as_the_dict_they_replace(tmp_path: Path) -> None:
    report = {"counts": {"label_issue": 2}, "out_dir": str(tmp_path)}
    result = stages.audit.AuditResult.of(report, tmp_path)
    assert result["counts"] == {"label_issue": 2} and result.get("missing") is None and "counts" in result
    assert result == report and dict(result) == report and len(result) == 2
    assert json.loads(json.dumps(result.as_dict())) == report
    assert result.csv == tmp_path / "audit.csv" and result.html == tmp_path / "audit.html"
    metrics = {"f1_macro": 0.5, "out_dir": str(tmp_path), "files": {"report": "report.html"}}
    evaluated = stages.evaluate.EvaluateResult.of(metrics)
    assert evaluated["f1_macro"] == 0.5 and evaluated == metrics
    assert evaluated.out == tmp_path and evaluated.files == {"report": tmp_path / "report.html"}
    with pytest.raises(TypeError):
        evaluated["f1_macro"] = 1.0  # type: ignore[index]


def test_download_summary_is_the_table_the_cli_prints() -> None:
    report = {"total_rows": 3, "counts": {"ok": 2, "http_error": 1}, "leakage": {"images": 0, "rows": 0},
              "label_conflicts": {"images": 0}}
    result = stages.download.DownloadResult(3, report["counts"], Path("m"), Path("r"), report, 3, 0.5)
    text = result.summary()
    assert text.splitlines()[0] == "imgclf download: 3 rows" and "http_error" in text and "66.7%" in text
    assert "\x1b[" not in text  # plain text: the colours are the stage's own printing on a terminal
