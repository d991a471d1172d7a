"""Plots and report.html: figures that grow with the class count, and the report opened in a
real headless Chromium (no console errors, every image rendered, a screenshot saved)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import CLASSES, demo_images, make_data_dir
from PIL import Image
from sklearn.metrics import top_k_accuracy_score

from imgclf.checkpoint import make_meta, save_slim
from imgclf.config import load_config
from imgclf.curves import training_curves
from imgclf.evaluate import _plots
from imgclf.manifest import write_manifest
from imgclf.models import create_model
from imgclf.presets import Preprocessing
from imgclf.stages import evaluate

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--headless=new", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HOSTILE = '<script>alert("x")</script> & co'  # a class name that must be escaped, not run


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def synthetic(k: int, n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n))
    names = [f"class number {i:02d} with a long name" for i in range(k)]
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k), names


def test_confusion_matrix_grows_and_adapts_at_60_classes(tmp_path: Path) -> None:
    small_cm, small_names = synthetic(3, 60)
    big_cm, big_names = synthetic(60, 3000)
    for normalize in (False, True):
        small = png_size(_plots.confusion_matrix(small_cm, small_names, tmp_path / f"s{normalize}.png",
                                                 normalize))
        big = png_size(_plots.confusion_matrix(big_cm, big_names, tmp_path / f"b{normalize}.png", normalize))
        assert big[0] > 2 * small[0] and big[1] > 2 * small[1]
    few, many = _plots.layout_for(3), _plots.layout_for(60)
    assert many.side > few.side and many.tick_fontsize < few.tick_fontsize
    assert (few.rotation, many.rotation) == (45, 90)
    assert few.annotate and not many.annotate  # 3600 numbers would be unreadable
    assert _plots.short("x" * 50).endswith("…") and len(_plots.short("x" * 50)) == _plots.MAX_LABEL


def test_per_class_and_pairs_plots(tmp_path: Path) -> None:
    def table(k: int) -> pd.DataFrame:
        return pd.DataFrame({"class": [f"c{i}" for i in range(k)], "f1": np.linspace(0, 1, k), "support": 5})

    small = png_size(_plots.per_class_f1(table(3), tmp_path / "f3.png", baseline_f1=0.3))
    big = png_size(_plots.per_class_f1(table(60), tmp_path / "f60.png", baseline_f1=0.02))
    assert big[1] > 3 * small[1]
    assert png_size(_plots.most_confused([("a", "b", 4), ("b", "a", 1)], tmp_path / "p.png"))[1] > 100
    assert (_plots.most_confused([], tmp_path / "none.png")).is_file()  # a perfect model still gets a figure
    history = pd.DataFrame({"epoch": [0, 1], "train_loss": [1.0, 0.5], "val_f1_macro": [0.4, 0.6]})
    assert training_curves(history, tmp_path / "c.png", 0.3).is_file()
    assert training_curves(pd.DataFrame({"epoch": []}), tmp_path / "none.png") is None


def make_wide_data_dir(dest: Path, k: int, per_split: int) -> tuple[Path, list[str]]:
    """k classes made by relabelling real Fashion-MNIST images (one class name is hostile HTML)."""
    names = [HOSTILE] + [f"class_{i:02d}" for i in range(1, k)]
    sources = {split: [p for c in CLASSES for p in demo_images(split, c, 40)] for split in ("train", "test")}
    rows = []
    for split, files in sources.items():
        for j in range(k * per_split):
            src = files[j]
            data = src.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            rel = f"images/{sha[:2]}/{sha}.png"
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / rel)
            rows.append({"row": len(rows), "url": f"http://example.invalid/{src.name}",
                         "label": names[j % k], "split": split, "status": "ok", "sha256": sha, "path": rel,
                         "width": 28, "height": 28})
    write_manifest(pd.DataFrame(rows), dest)
    return dest, names


def untrained_weights(path: Path, names: list[str]) -> Path:
    config = load_config(None, ["data.image_size=32", "model.arch=resnet18", "data.num_workers=0"])
    torch.manual_seed(0)
    model = create_model("resnet18", len(names))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    return save_slim(path, state, make_meta(config, sorted(names), Preprocessing.from_config(config.data)))


@pytest.fixture(scope="module")
def wide_eval(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("wide")
    data, names = make_wide_data_dir(root / "data", 60, per_split=2)
    weights = untrained_weights(root / "wide.pt", names)
    out = root / "eval"
    metrics = evaluate.run(evaluate.EvaluateOptions(model=weights, data=data, out=out, batch_size=64,
                                                    bootstrap_resamples=200, baseline_simulations=200))
    return out, metrics


@pytest.fixture(scope="module")
def tiny_eval(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny_eval")
    return out, evaluate.run(evaluate.EvaluateOptions(model=tiny_run, out=out, bootstrap_resamples=200,
                                                      baseline_simulations=200))


def test_wide_evaluation_has_top5_and_a_large_confusion_matrix(wide_eval: tuple[Path, dict]) -> None:
    out, m = wide_eval
    assert m["n_classes"] == 60 and m["n_images"] == 120
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    names = m["class_names"]
    y = np.array([names.index(t) for t in preds["true"]])
    # Scores rebuilt from top_k (the 5 best of 60 classes, in rank order): enough to score top-5.
    scores = np.zeros((len(preds), 60))
    for i, cell in enumerate(preds["top_k"]):
        items = json.loads(cell)
        assert len(items) == 5
        for rank, (label, _prob) in enumerate(items):
            scores[i, names.index(label)] = 5 - rank
    assert m["top5_accuracy"] == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=range(60)))
    assert png_size(out / "confusion_matrix.png")[0] > 2000


def open_in_chromium(html: Path, screenshot: Path) -> dict:
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: problems.append(msg.text)
                    if msg.type in ("error", "warning") else None)
            page.on("pageerror", lambda err: problems.append(str(err)))
            page.on("dialog", lambda dialog: (problems.append("dialog: " + dialog.message), dialog.dismiss()))
            page.on("request", lambda req: None if req.url.startswith(("file:", "data:"))
                    else problems.append("network: " + req.url))
            page.goto(html.as_uri(), wait_until="load")
            images = page.evaluate("""Array.from(document.images).map(i => ({
                src: i.getAttribute('src').slice(0, 22), w: i.naturalWidth, h: i.naturalHeight,
                complete: i.complete, alt: i.alt}))""")
            info = {
                "images": images,
                "scripts": page.evaluate("document.querySelectorAll('script').length"),
                "text": page.inner_text("body"),
                "problems": problems,
            }
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return info


@pytest.mark.browser
@pytest.mark.parametrize("which", ["tiny_eval", "wide_eval"])
def test_report_renders_in_chromium(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    out, m = request.getfixturevalue(which)
    shot = tmp_path / f"report-{which}.png"
    info = open_in_chromium(out / "report.html", shot)

    assert info["problems"] == []
    assert info["scripts"] == 0  # no script in the page, and the hostile class name stayed text
    gallery = [i for i in info["images"] if i["alt"].startswith("images/")]
    wrong = int(round(m["n_images"] * (1 - m["accuracy"])))
    assert len(gallery) == min(24, wrong)
    plots = {i["alt"] for i in info["images"]} - {i["alt"] for i in gallery}
    assert {"confusion matrix (counts)", "confusion matrix (row-normalised)", "F1 per class",
            "most confused pairs"} <= plots
    for image in info["images"]:
        assert image["src"].startswith("data:image/png;base64")
        assert image["complete"] and image["w"] > 0 and image["h"] > 0, image["alt"]
    text = info["text"]
    assert f"{m['f1_macro']:.3f}" in text and "weighted random" in text
    assert f"{m['baselines']['weighted_random']['f1_macro']:.3f}" in text
    assert "Resolved config" in text and "image_size: 32" in text
    if which == "tiny_eval":
        assert "training curves" in plots
        assert "Ankle_boot" in text
    else:
        assert HOSTILE in text
    assert png_size(shot)[1] > 2000  # a full-page screenshot, saved with the test's files


def test_report_without_a_download_report_says_so(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "d", ["Bag", "Coat"], n_train=3, n_test=3)
    weights = untrained_weights(tmp_path / "w.pt", ["Bag", "Coat"])
    evaluate.run(evaluate.EvaluateOptions(model=weights, data=data, bootstrap_resamples=50,
                                          baseline_simulations=50))
    html = (data / "evaluations" / "w-test" / "report.html").read_text()
    assert "No download_report.json" in html
    (data / "download_report.json").write_text('{"counts": {"ok": 12}, "leakage": {"test_in_train": 0}}')
    evaluate.run(evaluate.EvaluateOptions(model=weights, data=data, bootstrap_resamples=50,
                                          baseline_simulations=50))
    html = (data / "evaluations" / "w-test" / "report.html").read_text()
    assert "download_report.json</summary>" in html and "test_in_train: 0" in html
