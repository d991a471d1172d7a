"""Evaluate stage on a small really-trained run (tiny_run): metrics checked against
scikit-learn on predictions made independently here, the split fallback, shipped-weights
evaluation, the files written and the CLI's one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import make_data_dir
from PIL import Image
from sklearn import metrics as skm

from imgclf.checkpoint import load_model, read_checkpoint, save_slim
from imgclf.cli import main
from imgclf.errors import ConfigError, DataError
from imgclf.manifest import read_manifest, usable_rows, write_manifest
from imgclf.presets import eval_transform
from imgclf.stages import evaluate

EXPECTED_FILES = ("metrics.json", "predictions.csv", "classification_report.csv", "confusion_matrix.png",
                  "confusion_matrix_normalized.png", "per_class_f1.png", "most_confused.png", "report.html")


@pytest.fixture(scope="module")
def run_metrics(tiny_run: Path) -> evaluate.EvaluateResult:
    """Evaluate tiny_run with the defaults: test split, output into the run directory."""
    return evaluate.run(evaluate.EvaluateOptions(model=tiny_run, bootstrap_resamples=400,
                                                 baseline_simulations=400))


def independent_predictions(run_dir: Path, data_dir: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The test split predicted image by image, without evaluate's dataset or loader."""
    loaded = load_model(run_dir)
    transform = eval_transform(loaded.preprocessing)
    test = usable_rows(read_manifest(data_dir), "test")
    with Image.open(data_dir / test["path"][0]) as im:
        assert im.mode == "L"  # Fashion-MNIST is greyscale: the RGB conversion is exercised
    batch = torch.stack([transform(Image.open(data_dir / p).convert("RGB")) for p in test["path"]])
    with torch.no_grad():
        proba = torch.softmax(loaded.model(batch).double(), dim=1).numpy()
    y_true = np.array([loaded.class_names.index(label) for label in test["label"]])
    return test, y_true, proba


def test_metrics_equal_sklearn_on_independent_predictions(tiny_run: Path, tiny_data_dir: Path,
                                                          run_metrics: dict) -> None:
    test, y_true, proba = independent_predictions(tiny_run, tiny_data_dir)
    y_pred = proba.argmax(axis=1)
    m = run_metrics
    assert m["split"] == "test" and m["split_source"] == "manifest" and m["note"] == ""
    assert m["n_images"] == len(test) == 30
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y_true, proba, labels=[0, 1, 2]), rel=1e-5)
    assert m["top5_accuracy"] is None  # 3 classes
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    for i, name in enumerate(m["class_names"]):
        row = m["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (precision[i], recall[i], f1[i], support[i]))
    assert np.array_equal(m["confusion_matrix"], skm.confusion_matrix(y_true, y_pred))
    lo, hi = m["f1_macro_ci95"]
    assert lo <= m["f1_macro"] <= hi and lo < hi
    assert m["bootstrap"]["resamples"] == 400


def test_baselines_use_the_training_subset_shares(tiny_run: Path, run_metrics: dict) -> None:
    split = pd.read_csv(tiny_run / "split.csv")
    train = split.loc[split["subset"] == "train", "label"].value_counts(normalize=True)
    weighted = run_metrics["baselines"]["weighted_random"]
    assert weighted["class_shares"] == pytest.approx(train.to_dict())
    assert run_metrics["train_shares_source"] == "run split.csv (train subset)"
    # Test split is balanced (10 per class): expected accuracy = sum(shares)/3 = 1/3 exactly.
    assert weighted["accuracy"] == pytest.approx(1 / 3)
    assert run_metrics["baselines"]["uniform_random"]["accuracy"] == pytest.approx(1 / 3)
    assert run_metrics["baselines"]["majority"]["accuracy"] == pytest.approx(1 / 3)
    gain = run_metrics["vs_weighted_random"]["f1_macro_gain"]
    assert gain == pytest.approx(run_metrics["f1_macro"] - weighted["f1_macro"])


def test_files_written_into_the_run_directory(tiny_run: Path, tiny_data_dir: Path, run_metrics: dict) -> None:
    for name in EXPECTED_FILES:
        assert (tiny_run / name).is_file(), name
    assert (tiny_run / "training_curves.png").is_file()  # the run has metrics.csv
    on_disk = json.loads((tiny_run / "metrics.json").read_text())
    assert on_disk["f1_macro"] == run_metrics["f1_macro"]
    assert on_disk["files"]["report"] == "report.html"

    preds = pd.read_csv(tiny_run / "predictions.csv")
    assert list(preds.columns) == ["row", "path", "url", "true", "predicted", "correct", "confidence", "loss",
                                   "top_k"]
    test, y_true, proba = independent_predictions(tiny_run, tiny_data_dir)
    names = np.array(run_metrics["class_names"])
    assert preds["path"].tolist() == test["path"].tolist()
    assert preds["url"].tolist() == test["url"].tolist()  # the user's own name of each image
    assert preds["predicted"].tolist() == names[proba.argmax(axis=1)].tolist()
    assert preds["confidence"].to_numpy() == pytest.approx(proba.max(axis=1), rel=1e-5)
    first = json.loads(preds["top_k"][0])  # [[label, probability], ...], best first
    assert len(first) == 3 and first[0][0] == preds["predicted"][0]
    assert first[0][1] == pytest.approx(preds["confidence"][0], abs=5e-5)
    assert [p for _, p in first] == sorted((p for _, p in first), reverse=True)
    assert (preds["correct"] == (preds["true"] == preds["predicted"])).all()

    report = pd.read_csv(tiny_run / "classification_report.csv", index_col="class")
    assert set(names) | {"accuracy", "macro avg", "weighted avg"} == set(report.index)
    assert report.loc["macro avg", "f1-score"] == pytest.approx(run_metrics["f1_macro"])

    data = run_metrics["data"]
    assert data["status_counts"] == {"ok": 102}
    assert data["class_counts"][names[0]] == {"test": 10, "train": 24}
    assert data["leakage_found"] == {"test": 0} and data["leakage_evaluated"] == {"test": 0}


def test_summary_compares_with_the_baseline_and_warns(run_metrics: evaluate.EvaluateResult) -> None:
    text = run_metrics.summary()  # what `imgclf evaluate` prints
    assert text == evaluate.format_summary(run_metrics.as_dict())
    assert "F1-macro" in text and "weighted random" in text and "report.html" in text
    assert f"{run_metrics['f1_macro']:.3f}" in text
    weak = json.loads(json.dumps(run_metrics.as_dict()))
    weak["vs_weighted_random"]["clearly_above"] = False
    assert "not clearly above" in evaluate.format_summary(weak)
    weak["vs_weighted_random"]["clearly_above"] = True
    assert "not clearly above" not in evaluate.format_summary(weak)


def test_falls_back_to_the_run_validation_subset(tiny_run: Path, tmp_path: Path) -> None:
    # A data directory without a test split (what a user with a single CSV has).
    train_only = make_data_dir(tmp_path / "single", ["Ankle_boot", "Bag", "Coat"], n_train=24, n_test=0)
    m = evaluate.run(evaluate.EvaluateOptions(model=tiny_run, data=train_only, out=tmp_path / "ev",
                                              bootstrap_resamples=100, baseline_simulations=100))
    split = pd.read_csv(tiny_run / "split.csv")
    assert m["split"] == "val" and m["split_requested"] == "test"
    assert m["n_images"] == int((split["subset"] == "val").sum())
    assert "validation subset" in m["note"]
    assert "validation subset" in evaluate.format_summary(m)
    assert (tmp_path / "ev" / "report.html").is_file()
    assert not (tmp_path / "single" / "evaluations").exists()
    # split.csv rows get their url from the manifest where the row holds the same stored image
    preds = pd.read_csv(tmp_path / "ev" / "predictions.csv", keep_default_na=False)
    urls = read_manifest(train_only).set_index("row")["url"]
    assert preds["url"].tolist() == urls.loc[preds["row"]].tolist() and preds["url"].str.len().min() > 0


def test_gallery_and_predictions_name_the_users_file_or_url(tiny_run: Path, tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "d", ["Ankle_boot", "Bag", "Coat"], n_train=2, n_test=10)
    manifest = read_manifest(data)
    test = manifest["split"] == "test"
    names = sorted(set(manifest["label"]))
    # Every test label moved to the next class: the model is wrong on most, so the gallery is full.
    manifest.loc[test, "label"] = [names[(names.index(x) + 1) % 3] for x in manifest.loc[test, "label"]]
    manifest["url"] = [f"https://user:secret@shop.example/img/{r}.png?sig=abc" if r % 2 else f"photos/Bag/{r}.jpg"
                       for r in manifest["row"]]
    write_manifest(manifest, data)
    evaluate.run(evaluate.EvaluateOptions(model=tiny_run, data=data, out=tmp_path / "ev",
                                          bootstrap_resamples=50, baseline_simulations=50))
    preds = pd.read_csv(tmp_path / "ev" / "predictions.csv", keep_default_na=False)
    assert preds["url"].tolist() == manifest.set_index("row")["url"].loc[preds["row"]].tolist()
    html = (tmp_path / "ev" / "report.html").read_text()
    wrong = preds[~preds["correct"]].nlargest(24, "loss")  # the gallery: the 24 worst mistakes
    assert len(wrong) >= 10
    for row, url in zip(wrong["row"], wrong["url"], strict=True):
        shown = f"https://shop.example/img/{row}.png" if row % 2 else url
        assert f'<span class="u">{shown}</span>' in html
    assert "secret" not in html and "sig=abc" not in html  # a shared page carries no credentials


def test_a_missing_split_that_is_not_held_out_is_an_error(tiny_run: Path, tiny_data_dir: Path,
                                                          tmp_path: Path) -> None:
    # A typo must not silently evaluate something else: only test/val fall back to the run's val subset.
    with pytest.raises(DataError, match=r"split 'tset' \(splits here: test, train\)"):
        evaluate.run(evaluate.EvaluateOptions(model=tiny_run, data=tiny_data_dir, split="tset",
                                              out=tmp_path / "ev"))


def test_shipped_weights_give_the_same_metrics(tiny_run: Path, tiny_data_dir: Path, run_metrics: dict,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = read_checkpoint(tiny_run)
    weights = save_slim(tmp_path / "weights" / "tiny.pt", ckpt["state_dict"], ckpt["imgclf"])
    data = make_data_dir(tmp_path / "data", ["Ankle_boot", "Bag", "Coat"], n_train=24, n_test=10)
    code = main(["evaluate", "--weights", str(weights), "--data", str(data), "--seed", "0"])
    out_dir = data / "evaluations" / "tiny-test"
    assert code == 0
    printed = capsys.readouterr().out
    assert "weighted random" in printed and str(out_dir / "report.html") in printed
    m = json.loads((out_dir / "metrics.json").read_text())
    assert m["run_dir"] is None and m["model"]["checkpoint"] == str(weights.resolve())
    assert m["f1_macro"] == pytest.approx(run_metrics["f1_macro"])
    assert m["train_shares_source"] == "manifest split 'train'"
    shares = m["baselines"]["weighted_random"]["class_shares"]
    assert shares == pytest.approx({c: 1 / 3 for c in m["class_names"]})
    assert "training_curves" not in m["files"]  # no run, no history
    assert not (weights.parent / "metrics.json").exists()


def test_data_summary_counts_leakage_and_duplicates(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "d", ["Bag", "Coat"], n_train=3, n_test=2)
    manifest = read_manifest(data)
    train_row = manifest[manifest["split"] == "train"].iloc[0]
    extra = [  # a test row with the same content as a training image, once marked ok, once duplicate
        {**train_row.to_dict(), "row": 100, "split": "test", "status": "ok"},
        {**train_row.to_dict(), "row": 101, "split": "test", "status": "duplicate", "duplicate_of": 0},
        {**train_row.to_dict(), "row": 102, "split": "test", "status": "http_error", "sha256": "",
         "path": ""},
    ]
    write_manifest(pd.concat([manifest, pd.DataFrame(extra)], ignore_index=True), data)
    summary = evaluate.data_summary(read_manifest(data))
    assert summary["status_counts"] == {"ok": 11, "duplicate": 1, "http_error": 1}
    assert summary["duplicates"] == 1
    assert summary["leakage_found"] == {"test": 2}
    assert summary["leakage_evaluated"] == {"test": 1}
    assert summary["class_counts"]["Bag"] == {"test": 3, "train": 3}


def test_the_model_has_one_name_in_every_spelling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgclf.cli import build_parser
    from imgclf.cli._common import one_model

    monkeypatch.chdir(tmp_path)
    Path("runs/x").mkdir(parents=True)
    for argv in (["evaluate", "runs/x"], ["evaluate", "--model", "runs/x"], ["evaluate", "--weights", "runs/x"]):
        assert one_model(build_parser().parse_args(argv)) == Path("runs/x")
    with pytest.raises(ConfigError, match="two models"):
        one_model(build_parser().parse_args(["evaluate", "runs/x", "--model", "runs/y"]))


def test_errors_are_one_line(tmp_path: Path, tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="--data"):
        evaluate.resolve(evaluate.EvaluateOptions(model=tmp_path / "w.pt"))
    with pytest.raises(DataError, match="missing: no such model"):  # named before anything asks for --data
        evaluate.run(evaluate.EvaluateOptions(model=tmp_path / "missing"))
    with pytest.raises(DataError, match="no downloaded images with split 'holdout'"):
        evaluate.run(evaluate.EvaluateOptions(model=tiny_run / "checkpoints" / "best.ckpt",
                                              data=make_data_dir(tmp_path / "d", ["Bag", "Coat"], 2, 1),
                                              split="holdout"))
    assert main(["evaluate"]) == 2  # no model: a usage error, like every command
    (tmp_path / "w.pt").write_bytes(b"a model file")  # exists: a missing one is named as such first
    assert main(["evaluate", "--model", str(tmp_path / "w.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("imgclf evaluate: error: evaluate ") and err[-1].endswith(
        "w.pt: a model file needs --data DATA_DIR (a run directory knows its data)")


@pytest.mark.parametrize("device, said", [("foo", "not a device"), ("cuda:7", "no such CUDA device"),
                                          ("mps", "MPS is not available")])
def test_an_unusable_device_is_one_line_exit_2(tiny_run: Path, tmp_path: Path, capsys, device: str,
                                               said: str) -> None:
    from imgclf import cli

    code = cli.main(["evaluate", "--model", str(tiny_run), "--device", device, "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 2 and said in err and err.count("\n") == 1, err
