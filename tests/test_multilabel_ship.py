"""Shipping a multi-label model (issue 24 item 4): predict, export, serve and the Python API.

The model is a seeded, untrained resnet18 with multi-label metadata (task, thresholds) saved
as a checkpoint, so these tests do not depend on training; the thresholds are each label's median
probability on the composites, so every label is predicted for some images and not for others.
What is checked is the contract: the labels reported are exactly those at or above their
thresholds, the same through the checkpoint, ONNX, TorchScript, serve and the API, and the
exported files carry the task and thresholds. tests/test_multilabel_e2e.py trains a real one.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import ThreadedServer

from imgclf import cli
from imgclf.images import open_image_file
from imgclf.inference import load_classifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import multilabel_corpus as corpus_builder  # noqa: E402

OVERRIDES = ["task=multilabel", "loss.name=bce", "model.arch=resnet18", "data.image_size=32"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> corpus_builder.Corpus:
    spec = corpus_builder.CorpusSpec(images=24, seed=3)
    return corpus_builder.build(tmp_path_factory.mktemp("mlcorpus"), corpus_builder.fashion_sources("test", 8), spec)


def _save(path: Path, model: torch.nn.Module, classes: list[str], meta_extra: dict) -> Path:
    from imgclf.checkpoint import make_meta, save_slim
    from imgclf.config import load_config

    meta = make_meta(load_config(None, OVERRIDES), classes) | meta_extra
    return save_slim(path, {f"model.{k}": v for k, v in model.state_dict().items()}, meta)


def _probs(model_path: Path, images: list[Path]) -> np.ndarray:
    classifier = load_classifier(model_path)
    return classifier.probabilities(classifier.prepare_batch([open_image_file(str(p)) for p in images]))


@pytest.fixture(scope="module")
def ckpt(corpus: corpus_builder.Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from imgclf.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", len(corpus.classes), announce=False).eval()
    path = tmp_path_factory.mktemp("ckpt") / "ml.ckpt"
    _save(path, model, corpus.classes, {"task": "multilabel", "thresholds": [0.5] * len(corpus.classes)})
    # Each label's median probability on the composites: about half the images carry each label.
    medians = np.median(_probs(path, _images(corpus)), axis=0)
    return _save(path, model, corpus.classes, {"task": "multilabel", "thresholds": [float(m) for m in medians]})


def _images(corpus: corpus_builder.Corpus) -> list[Path]:
    return sorted(corpus.images.glob("*.png"))


def _expected(model_path: Path, images: list[Path]) -> dict[str, list[str]]:
    """Per image, the labels whose probability is at or above their threshold, highest first."""
    classifier = load_classifier(model_path)
    probs = _probs(model_path, images)
    out = {}
    for path, row in zip(images, probs, strict=True):
        keep = [j for j in np.argsort(-row, kind="stable") if row[j] >= classifier.thresholds[j]]
        out[str(path)] = [classifier.class_names[j] for j in keep]
    return out


def _predict_csv(model: Path, inputs: list[str], out: Path) -> list[dict[str, str]]:
    assert cli.main(["predict", "--model", str(model), *inputs, "-o", str(out), "--no-progress", "--top-k", "3"]) == 0
    return list(csv.DictReader(io.StringIO(out.read_text())))


def test_classifier_of_a_multilabel_checkpoint_uses_sigmoid_and_thresholds(ckpt: Path, corpus) -> None:
    classifier = load_classifier(ckpt)
    assert classifier.multilabel and len(classifier.thresholds) == len(corpus.classes)
    from imgclf.checkpoint import load_model

    batch = classifier.prepare_batch([open_image_file(str(p)) for p in _images(corpus)[:4]])
    with torch.no_grad():
        want = torch.sigmoid(load_model(ckpt).model(torch.as_tensor(batch))).numpy()
    got = classifier.probabilities(batch)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got.sum(axis=1), 1.0)  # independent per-label probabilities, not a softmax


def test_predict_writes_label_sets_above_thresholds(ckpt: Path, corpus, tmp_path: Path) -> None:
    rows = _predict_csv(ckpt, [str(corpus.images)], tmp_path / "p.csv")
    assert list(rows[0])[:7] == ["input", "status", "error", "labels", "scores", "label_1", "probability_1"]
    want = _expected(ckpt, _images(corpus))
    assert len(rows) == len(want)
    sizes = set()
    for row in rows:
        labels = row["labels"].split("|") if row["labels"] else []
        assert labels == want[row["input"]], row
        scores = [float(s) for s in row["scores"].split("|")] if row["scores"] else []
        assert len(scores) == len(labels) and scores == sorted(scores, reverse=True)
        sizes.add(len(labels))
    assert len(sizes) > 2  # thresholds at the medians: sets of several sizes, not all or nothing

    out = tmp_path / "p.jsonl"
    assert cli.main(["predict", "--model", str(ckpt), str(corpus.images), "-o", str(out), "--no-progress"]) == 0
    first = json.loads(out.read_text().splitlines()[0])
    assert first["task"] == "multilabel" and [x["label"] for x in first["labels"]] == want[first["input"]]
    assert len(first["top"]) == 5 and set(first["labels"][0]) == {"label", "score"} if first["labels"] else True


@pytest.fixture(scope="module")
def exported(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from imgclf.export import PARITY_TOLERANCE, ExportOptions
    from imgclf.export import run as export_run

    folder = tmp_path_factory.mktemp("export")
    out = {}
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.torchscript")):
        result = export_run(ExportOptions(ckpt, fmt, folder / name))
        assert result.max_abs_diff <= PARITY_TOLERANCE  # the parity check single-label has
        out[fmt] = result.path
    return out


def test_exported_files_carry_task_and_thresholds(ckpt: Path, exported: dict[str, Path]) -> None:
    import onnx

    thresholds = load_classifier(ckpt).thresholds
    props = {p.key: p.value for p in onnx.load(str(exported["onnx"])).metadata_props}
    meta = json.loads(props["imgclf"])
    assert meta["task"] == "multilabel" and meta["thresholds"] == thresholds
    assert props["task"] == "multilabel" and json.loads(props["thresholds"]) == thresholds
    from imgclf.modelfile import load_torchscript

    _, ts_meta = load_torchscript(exported["torchscript"])
    assert ts_meta.task == "multilabel" and ts_meta.thresholds == thresholds
    for path in exported.values():
        assert load_classifier(path).thresholds == thresholds


def test_exported_files_predict_the_same_sets(ckpt: Path, exported: dict[str, Path], corpus, tmp_path: Path) -> None:
    want = {r["input"]: r["labels"] for r in _predict_csv(ckpt, [str(corpus.images)], tmp_path / "ckpt.csv")}
    for fmt, path in exported.items():
        got = {r["input"]: r["labels"] for r in _predict_csv(path, [str(corpus.images)], tmp_path / f"{fmt}.csv")}
        # ONNX runs its own resize (Pillow, within 1 level in 255): a score on a threshold may flip.
        same = np.mean([got[k] == want[k] for k in want])
        assert same >= (0.9 if fmt == "onnx" else 1.0), (fmt, same)


def test_single_label_export_metadata_has_no_task(tiny_run: Path, tmp_path: Path) -> None:
    from imgclf.export import ExportOptions
    from imgclf.export import run as export_run

    result = export_run(ExportOptions(tiny_run, "torchscript", tmp_path / "single.torchscript"))
    from imgclf.modelfile import load_torchscript

    _, meta = load_torchscript(result.path)
    assert meta.task == "single_label" and meta.thresholds is None
    assert load_classifier(result.path).thresholds is None



@pytest.fixture(scope="module")
def served(exported: dict[str, Path]) -> Iterator[str]:
    from imgclf.serve import create_app

    with ThreadedServer(create_app(load_classifier(exported["torchscript"]))) as base:
        yield base


def test_serve_answers_labels_above_thresholds(served: str, ckpt: Path, corpus) -> None:
    images = _images(corpus)[:6]
    want = _expected(ckpt, images)
    for path in images:
        reply = httpx.post(f"{served}/predict", content=path.read_bytes(), headers={"content-type": "image/png"},
                           params={"top_k": 3}, timeout=30)
        assert reply.status_code == 200
        body = reply.json()
        assert body["task"] == "multilabel" and len(body["top_k"]) == 3
        assert [x["label"] for x in body["labels"]] == want[str(path)]
        assert all(set(x) == {"label", "score"} for x in body["labels"])
    labels = httpx.get(f"{served}/labels").json()
    assert labels["labels"] == corpus.classes and labels["thresholds"] == load_classifier(ckpt).thresholds
    assert httpx.get(f"{served}/health").json()["task"] == "multilabel"


def test_api_predict_returns_labels_with_scores(ckpt: Path, corpus) -> None:
    from PIL import Image

    import imgclf

    model = imgclf.load(ckpt)
    assert model.task == "multilabel" and list(model.thresholds) == corpus.classes
    images = _images(corpus)[:5]
    want = _expected(ckpt, images)
    preds = model.predict(images, top_k=2)
    for path, pred in zip(images, preds, strict=True):
        assert [label for label, _ in pred.labels] == want[str(path)]
        assert all(score >= model.thresholds[label] for label, score in pred.labels)
        assert len(pred.top) == 2
    with Image.open(images[0]) as im:  # an in-memory image takes the other road through the API
        assert [label for label, _ in model.predict(im.convert("RGB")).labels] == want[str(images[0])]


def test_thresholds_that_do_not_fit_are_one_line_errors(ckpt: Path, corpus, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from imgclf.checkpoint import read_checkpoint, save_slim

    full = read_checkpoint(ckpt)
    bad = save_slim(tmp_path / "bad.ckpt", full["state_dict"], full["imgclf"] | {"thresholds": [0.5, 0.5]})
    code = cli.main(["predict", "--model", str(bad), str(_images(corpus)[0]), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.ckpt" in err[0] and "thresholds" in err[0]
