"""One way in: every stage that opens a model file goes through `imgclf.inference.load` (issue 21 item 1).

Two checks: the source (no module but the loader calls what reads a model file), and the running
stages (evaluate, export, audit, predict, the API each really open a model, and every file read
happens inside the loader, once per model).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import CLASSES, demo_images

from imgclf import checkpoint, modelfile
from imgclf.inference import _handle, load, load_classifier

SRC = Path(__file__).resolve().parents[1] / "src" / "imgclf"
LOADER = SRC / "inference" / "_handle.py"
# What reads a model file: checkpoints, TorchScript, ONNX metadata, an onnxruntime session, a backend.
OPENING = {"load_model", "load_torchscript", "read_onnx_metadata", "onnx_metadata", "InferenceSession",
           "OnnxBackend", "TorchBackend", "TorchScriptBackend"}
# The stages that take --model, and the names through which they reach the loader.
STAGE_MODULES = ["predict/__init__.py", "predict/_ray.py", "serve/__init__.py", "evaluate/_scoring.py",
                 "export/_run.py", "audit/_embed.py", "api.py"]


def _called(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        if func.attr == "load" and isinstance(func.value, ast.Attribute) and func.value.attr == "jit":
            return "jit.load"
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _openers_called(path: Path) -> set[str]:
    calls = (n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Call))
    return {name for call in calls if (name := _called(call)) in OPENING | {"jit.load"}}


def test_no_module_but_the_loader_reads_a_model_file() -> None:
    # Where the readers are defined (load_torchscript calls jit.load, OnnxBackend an InferenceSession), and the loader.
    defining = {SRC / "modelfile.py", SRC / "checkpoint.py", SRC / "inference" / "_backends.py", LOADER}
    found = {str(p.relative_to(SRC)): names for p in sorted(SRC.rglob("*.py"))
             if p not in defining and (names := _openers_called(p))}
    assert not found, f"open models through imgclf.inference.load, not directly: {found}"
    assert _openers_called(LOADER) >= {"load_model", "load_torchscript", "onnx_metadata", "OnnxBackend"}


def test_every_stage_that_takes_a_model_imports_the_loader() -> None:
    missing = []
    for rel in STAGE_MODULES:
        tree = ast.parse((SRC / rel).read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "imgclf.inference"
                 for a in n.names}
        if not names & {"load", "load_classifier"}:
            missing.append(rel)
    assert not missing, f"these stages open models without imgclf.inference.load: {missing}"


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts every model-file read (the real readers run) by the file that called the reader."""
    calls: Counter = Counter()

    def counted(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[(Path(inspect.stack()[1].filename).name, name)] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for module, name in ((checkpoint, "load_model"), (modelfile, "load_torchscript"),
                         (modelfile, "onnx_metadata"), (modelfile, "read_onnx_metadata")):
        counted(module, name)
    return calls


def test_stages_open_models_only_through_the_loader(tiny_run: Path, tiny_data_dir: Path, tmp_path: Path,
                                                    reads: Counter) -> None:
    from imgclf import api
    from imgclf.audit import _embed
    from imgclf.stages import evaluate, export, predict

    exported = export.run(export.ExportOptions(tiny_run, "torchscript", tmp_path / "model.torchscript")).path
    assert reads == {("_handle.py", "load_model"): 1, ("_handle.py", "load_torchscript"): 1}  # + the read-back
    reads.clear()
    metrics = evaluate.run(evaluate.EvaluateOptions(model=exported, data=tiny_data_dir, out=tmp_path / "ev",
                                                    bootstrap_resamples=50, baseline_simulations=50,
                                                    progress=False))
    assert metrics["model"]["arch"] == "resnet18" and metrics["n_images"] == 30
    assert reads == {("_handle.py", "load_torchscript"): 1}  # an exported file is read once (it was twice)
    reads.clear()
    assert _embed.load_embedder(tiny_run).kind == "penultimate layer"
    result = predict.run(predict.PredictOptions(inputs=[str(demo_images("test", CLASSES[0], 1)[0])],
                                                model=tiny_run, out=tmp_path / "p.csv", progress=False))
    assert (result.ok, result.failed) == (1, 0)
    api.load(exported)
    assert reads == {("_handle.py", "load_model"): 2, ("_handle.py", "load_torchscript"): 1}


def test_the_handle_carries_what_the_stages_need(tiny_run: Path, tmp_path: Path) -> None:
    from imgclf.stages import export

    handle = load(tiny_run)
    assert handle.arch == handle.config.model.arch == "resnet18" and handle.device == "cpu"
    assert handle.meta["class_names"] == handle.class_names and "config" in handle.meta  # ckpt["imgclf"] whole
    assert handle.module is not None and not handle.exported
    assert handle.task == "single_label" and handle.thresholds is None  # no task key stored: single-label
    # Fields the loader does not know flow through `meta` (the multi-label task, its thresholds).
    tagged = dataclasses.replace(handle, meta={**handle.meta, "task": "multilabel", "thresholds": [0.5, 0.25, 1]})
    assert tagged.task == "multilabel" and tagged.thresholds == [0.5, 0.25, 1.0]
    exported = load(export.run(export.ExportOptions(tiny_run, "torchscript", tmp_path / "m.torchscript")).path)
    assert exported.exported and exported.config is None and exported.meta["arch"] == "resnet18"
    assert exported.meta["exporter"] == "torch.jit.trace" and exported.class_names == handle.class_names
    batch = load_classifier(tiny_run).prepare_batch([])  # the classifier is a view of the same handle
    assert batch.shape[0] == 0
    probe = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(exported.backend.probabilities(probe), handle.backend.probabilities(probe), atol=1e-5)


def test_a_new_backend_is_one_entry(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/architecture.md's claim: register an opener, and `load` (so every stage) can use it."""
    opened = []
    want = load(tiny_run).class_names

    def traced(path, kind, device):
        opened.append(kind)
        return _handle.OPENERS["torch"](path, kind, device)

    monkeypatch.setitem(_handle.OPENERS, "traced", traced)
    monkeypatch.setattr(_handle, "BACKENDS", (*_handle.BACKENDS, "traced"))
    monkeypatch.setitem(_handle.NATURAL, modelfile.ModelKind.RUN, "traced")
    assert load_classifier(tiny_run).class_names == want
    assert opened == [modelfile.ModelKind.RUN]


@pytest.mark.parametrize("workers", [0, 1])
def test_evaluate_preprocesses_as_eval_transform_bitwise(tiny_run: Path, tiny_data_dir: Path, workers: int) -> None:
    """Evaluate now runs predict's batched preprocessor; its probabilities equal the old road's exactly
    (presets.eval_transform one image at a time in the DataLoader, default collate)."""
    import torch
    from torch.utils.data import DataLoader

    from imgclf.data import ImageFolderFrame
    from imgclf.evaluate import _scoring
    from imgclf.manifest import read_manifest, usable_rows
    from imgclf.presets import eval_transform

    model = _scoring.open_model(tiny_run, "cpu")
    frame = usable_rows(read_manifest(tiny_data_dir), "test")[["row", "path", "label", "url"]]
    got, y_true = _scoring.predict_proba(model, frame, tiny_data_dir, 8, workers, progress=False)
    old = ImageFolderFrame(frame, tiny_data_dir, model.class_names, eval_transform(model.handle.preprocessing),
                           skip_unreadable=True)
    with torch.inference_mode():
        want = np.concatenate([model.probabilities(images) for images, _ in DataLoader(old, batch_size=8)])
    assert got.shape == (30, 3) and np.array_equal(got, want)
    assert np.array_equal(y_true, old.targets.numpy())
