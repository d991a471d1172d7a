"""export: ONNX/TorchScript files carry their metadata and agree with PyTorch on held-out real images."""

from __future__ import annotations

import csv
import io
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import uvicorn
from helpers import CLASSES, demo_images, make_data_dir

from imgclf import cli, modelfile
from imgclf.checkpoint import load_model
from imgclf.errors import DataError
from imgclf.export import _run as export_run
from imgclf.images import open_image_file
from imgclf.inference import load_classifier
from imgclf.presets import eval_transform
from imgclf.stages import export


def held_out_batch(pre, per_class: int = 8) -> tuple[torch.Tensor, list[Path]]:
    """Bundled *test* images of every class (the tiny run trained on train images only)."""
    paths = [p for label in CLASSES for p in demo_images("test", label, 40)[-per_class:]]
    transform = eval_transform(pre)
    return torch.stack([transform(open_image_file(str(p))) for p in paths]), paths


@pytest.fixture(scope="module")
def onnx_file(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export.run(export.ExportOptions(tiny_run, "onnx", tmp_path_factory.mktemp("export") / "model.onnx")).path


def test_onnx_parity_on_held_out_real_images(tiny_run: Path, onnx_file: Path) -> None:
    loaded = load_model(tiny_run)
    batch, paths = held_out_batch(loaded.preprocessing)
    with torch.no_grad():
        want = torch.softmax(loaded.model(batch), dim=1).numpy()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    logits, got = session.run(["logits", "probabilities"], {"input": batch.numpy()})
    diff = float(np.abs(want - got).max())
    print(f"ONNX vs PyTorch on {len(paths)} held-out images: max |diff| = {diff:.2e}")
    assert got.shape == (len(paths), len(loaded.class_names))
    assert diff <= 1e-4
    assert (want.argmax(1) == got.argmax(1)).all()
    # The trained model is not uniform, so the comparison above is not trivially satisfied.
    assert want.max(1).mean() > 1.0 / len(loaded.class_names) + 0.05
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(logits.argmax(1), got.argmax(1))


def test_onnx_batch_dimension_is_dynamic(onnx_file: Path, tiny_run: Path) -> None:
    pre = load_model(tiny_run).preprocessing
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic name, not a number
    batch, _ = held_out_batch(pre, per_class=2)
    one = session.run(["probabilities"], {"input": batch[:1].numpy()})[0]
    many = session.run(["probabilities"], {"input": batch.numpy()})[0]
    assert one.shape[0] == 1 and many.shape[0] == len(batch)
    np.testing.assert_allclose(one[0], many[0], atol=1e-5)


def test_onnx_metadata_is_what_inference_needs(onnx_file: Path, tiny_run: Path) -> None:
    loaded = load_model(tiny_run)
    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    meta = json.loads(props["imgclf"])
    assert meta["class_names"] == loaded.class_names
    assert meta["preprocessing"] == loaded.preprocessing.to_plain()
    assert meta["exporter"].startswith("torch.onnx")
    # Readable flat keys for tools that do not parse our JSON.
    assert json.loads(props["class_names"]) == loaded.class_names
    assert int(props["image_size"]) == loaded.preprocessing.image_size
    assert int(props["resize_size"]) == loaded.preprocessing.resize_size
    assert json.loads(props["mean"]) == list(loaded.preprocessing.mean)
    assert props["interpolation"] == loaded.preprocessing.interpolation
    read = modelfile.read_onnx_metadata(onnx_file)
    assert read.class_names == loaded.class_names and read.preprocessing == loaded.preprocessing


def test_onnx_file_alone_predicts_like_the_run(onnx_file: Path, tiny_run: Path, tmp_path: Path) -> None:
    alone = tmp_path / "elsewhere" / "model.onnx"  # no run directory next to it
    alone.parent.mkdir()
    shutil.copyfile(onnx_file, alone)
    from_onnx = load_classifier(alone, "onnx")
    from_torch = load_classifier(tiny_run, "torch")
    assert from_onnx.backend.name == "onnx" and from_onnx.class_names == from_torch.class_names
    batch, _ = held_out_batch(from_onnx.preprocessing, per_class=3)
    a = from_onnx.probabilities(list(batch))
    b = from_torch.probabilities(list(batch))
    assert np.abs(a - b).max() <= 1e-4


def test_torchscript_export_parity_and_metadata(tiny_run: Path, tmp_path: Path) -> None:
    result = export.run(export.ExportOptions(tiny_run, "torchscript", tmp_path / "model.torchscript"))
    assert result.max_abs_diff <= 1e-5 and modelfile.is_torchscript(result.path)
    module, meta = modelfile.load_torchscript(result.path)
    loaded = load_model(tiny_run)
    assert meta.class_names == loaded.class_names and meta.preprocessing == loaded.preprocessing
    batch, _ = held_out_batch(loaded.preprocessing, per_class=3)
    with torch.no_grad():
        want = torch.softmax(loaded.model(batch), dim=1)
        got = module(batch)[1]
    assert float((want - got).abs().max()) <= 1e-5
    assert load_classifier(result.path).backend.name == "torchscript"  # auto-detected
    assert not modelfile.is_torchscript(load_model(tiny_run).path)  # a checkpoint is not mistaken for one


def test_cli_export_default_path_and_message(tiny_run: Path, tmp_path: Path, capsys) -> None:
    run_copy = tmp_path / "run"
    shutil.copytree(tiny_run, run_copy)
    assert cli.main(["export", "--model", str(run_copy), "--format", "onnx"]) == 0
    assert (run_copy / "model.onnx").is_file()
    out = capsys.readouterr().out
    assert "model.onnx" in out and "max |exported - torch|" in out
    assert not list(run_copy.glob("*.tmp"))


def test_export_errors_are_one_line(tmp_path: Path, capsys) -> None:
    bogus = tmp_path / "not_a_checkpoint.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    assert cli.main(["export", "--model", str(bogus)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a text file" in err  # says what the file is instead
    assert cli.main(["export", "--model", str(tmp_path / "missing")]) == 2


def test_exporter_crash_leaves_no_tmp_file_and_one_line_error(tiny_run: Path, tmp_path: Path,
                                                              monkeypatch, capsys) -> None:
    # Stand-in for an exporter crash mid-write, which no real model reliably triggers.
    def crash(wrapped, probe, path: Path, dynamo: bool) -> None:
        path.write_bytes(b"half an onnx file")
        raise RuntimeError("exporter blew up\nwith a long internal traceback")

    monkeypatch.setattr(export_run, "_onnx_export", crash)
    out = tmp_path / "model.onnx"
    assert cli.main(["export", "--model", str(tiny_run), "--format", "onnx", "-o", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "RuntimeError: exporter blew up" in err
    assert list(tmp_path.iterdir()) == []  # neither model.onnx nor model.onnx.tmp


def test_onnx_without_metadata_is_refused(onnx_file: Path, tmp_path: Path) -> None:
    model = onnx.load(str(onnx_file))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(DataError, match="without 'imgclf' metadata"):
        load_classifier(bare, "onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not protobuf")
    with pytest.raises(DataError):
        load_classifier(garbage)


# --- INT8 (`export --quantize int8`) ----------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "fashion_mnist_resnet18_half.pt"


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, export.ExportResult]:
    """The shipped resnet, fp32 and int8, calibrated on bundled *train* images, judged on bundled *test* ones."""
    tmp = tmp_path_factory.mktemp("int8")
    data = make_data_dir(tmp / "data", CLASSES, n_train=10, n_test=20)
    fp32 = export.run(export.ExportOptions(SHIPPED, "onnx", tmp / "model.onnx")).path
    options = export.QuantizeOptions(data, calibration_images=64)
    return fp32, export.run(export.ExportOptions(SHIPPED, "onnx", tmp / "model.int8.onnx", "int8", options))


def test_int8_export_is_static_int8_with_metadata_and_a_parity_report(int8_export) -> None:
    fp32, result = int8_export
    q = result.quantization
    assert q is not None and q.method.startswith("static QDQ") and q.calibration_images == 64
    assert "split test, 200 images" in q.held_out
    print(f"int8 vs fp32 on 200 held-out images: agreement {q.top1_agreement:.1%}, "
          f"F1 {q.f1_fp32:.4f} -> {q.f1_int8:.4f}")
    assert q.top1_agreement >= 0.97 and q.f1_fp32 > 0.8  # a model that has learned, nearly unchanged
    assert abs(q.f1_change) <= 0.03
    model = onnx.load(str(result.path))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantised, not a copy
    assert result.path.stat().st_size < fp32.stat().st_size / 2  # int8 weights
    want, got = modelfile.read_onnx_metadata(fp32), modelfile.read_onnx_metadata(result.path)
    assert got.class_names == want.class_names and got.preprocessing == want.preprocessing
    meta = json.loads({p.key: p.value for p in model.metadata_props}["imgclf"])
    assert meta["quantization"]["dtype"] == "int8" and meta["quantization"]["calibration_images"] == 64


def _top1(csv_text: str) -> dict[str, str]:
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert rows and all(row["status"] == "ok" for row in rows)
    return {row["input"]: row["label_1"] for row in rows}


def test_int8_model_predicts_and_serves_like_fp32(int8_export, tmp_path: Path) -> None:
    fp32, result = int8_export
    folder = tmp_path / "images"
    for label in CLASSES:  # held-out images the calibration never saw (it used train images)
        for src in demo_images("test", label, 40)[-5:]:
            (folder / label).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, folder / label / src.name)
    outs = {}
    for name, model in (("fp32", fp32), ("int8", result.path)):
        out = tmp_path / f"{name}.csv"
        assert cli.main(["predict", "--model", str(model), str(folder), "-o", str(out), "--no-progress"]) == 0
        outs[name] = _top1(out.read_text())
    agree = np.mean([outs["fp32"][k] == outs["int8"][k] for k in outs["fp32"]])
    assert len(outs["int8"]) == 50 and agree >= 0.96  # 48 of 50 at least

    from imgclf.serve import create_app

    app = create_app(load_classifier(result.path))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        assert httpx.get(f"{base}/health").json()["backend"] == "onnx"
        for path in sorted(folder.rglob("*.png"))[::5]:
            reply = httpx.post(f"{base}/predict", content=path.read_bytes(), headers={"content-type": "image/png"})
            assert reply.status_code == 200
            assert reply.json()["predictions"][0]["label"] == outs["int8"][str(path)]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_int8_without_calibration_data_is_dynamic(tiny_run: Path, tmp_path: Path) -> None:
    result = export.run(export.ExportOptions(tiny_run, "onnx", tmp_path / "m.int8.onnx", "int8"))
    q = result.quantization
    assert q is not None and q.method.startswith("dynamic") and q.top1_agreement is None
    assert "no calibration data" in q.held_out
    batch, _ = held_out_batch(load_model(tiny_run).preprocessing, per_class=3)
    fp32 = load_classifier(tiny_run, "torch").probabilities(list(batch))
    int8 = load_classifier(result.path).probabilities(list(batch))
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 0.9 and np.abs(fp32 - int8).max() < 0.1


def test_quantize_mistakes_are_one_line(tiny_run: Path, tmp_path: Path, capsys) -> None:
    cases = [["--quantize", "int8", "--format", "torchscript"],
             ["--calibration-data", str(tmp_path)],
             ["--quantize", "int8", "--calibration-data", str(tmp_path)],  # no manifest there
             ["--quantize", "int8", "--calibration-images", "0"]]
    for extra in cases:
        assert cli.main(["export", "--model", str(tiny_run), "-o", str(tmp_path / "x.onnx"), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err, extra
    assert not list(tmp_path.glob("*.onnx*")) and not list(tmp_path.glob(".x*"))


def test_the_python_api_quantises_too(tiny_run: Path, tmp_path: Path) -> None:
    import imgclf

    result = imgclf.export(tiny_run, tmp_path / "api.int8.onnx", quantize="int8")
    assert result.quantization is not None and result.quantization.method.startswith("dynamic")
    assert load_classifier(result.path).class_names == load_model(tiny_run).class_names
