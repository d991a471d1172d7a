"""export: ONNX/TorchScript files carry their metadata and agree with PyTorch on held-out real images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import CLASSES, demo_images

from imgclf import cli, modelfile
from imgclf.checkpoint import load_model
from imgclf.errors import DataError
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
    return export.run(tiny_run, "onnx", tmp_path_factory.mktemp("export") / "model.onnx").path


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
    result = export.run(tiny_run, "torchscript", tmp_path / "model.torchscript")
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

    monkeypatch.setattr(export, "_onnx_export", crash)
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
