"""Multi-label metrics (evaluate/_multilabel_metrics.py) against scikit-learn, the frequency
baseline, and the training losses (train/_multilabel.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from imgclf.evaluate import _multilabel_metrics as mm
from imgclf.train import _multilabel as tml


def _data(n: int = 60, c: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < [0.5, 0.3, 0.2, 0.1]).astype(np.uint8)
    # scores that know something, rounded so that ties occur
    proba = np.clip(np.round(0.3 * y + 0.7 * rng.random((n, c)), 1), 0, 1)
    return y, proba, (proba >= 0.5).astype(np.uint8)


def test_weighted_ap_with_unit_weights_is_scikit_learns_ap_ties_included():
    y, proba, _ = _data()
    for j in range(y.shape[1]):
        ours = mm._weighted_ap(np.ones((1, len(y))), y[:, j], proba[:, j])[0]
        assert ours == pytest.approx(skm.average_precision_score(y[:, j], proba[:, j]))
    # duplicated images (weight 2) count twice, as scikit-learn's sample_weight
    w = np.random.default_rng(1).integers(0, 3, size=len(y)).astype(float)
    ours = mm._weighted_ap(w[None, :], y[:, 0], proba[:, 0])[0]
    assert ours == pytest.approx(skm.average_precision_score(y[:, 0], proba[:, 0], sample_weight=w))


def test_point_metrics_are_scikit_learns_and_the_intervals_hold_them():
    y, proba, pred = _data()
    head = mm.point_metrics(y, proba, pred)
    assert head["f1_micro"] == pytest.approx(skm.f1_score(y, pred, average="micro"))
    assert head["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert head["map"] == pytest.approx(np.mean([skm.average_precision_score(y[:, j], proba[:, j])
                                                 for j in range(4)]))
    assert head["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert head["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred))
    boot = mm.bootstrap(y, proba, pred, resamples=300, seed=0, level=0.95)
    for key in mm.HEADLINE:
        lo, hi = boot["headline"][key]
        assert lo <= head[key] <= hi and lo < hi, key
    per = mm.per_label(y, proba, pred, list("abcd"), [0.5] * 4)
    for j, name in enumerate("abcd"):
        lo, hi = boot["per_label"]["f1"][j]
        assert lo <= per[name]["f1"] <= hi
        assert per[name]["support"] == int(y[:, j].sum())


def test_a_label_without_positives_is_left_out_of_macro_f1_and_map():
    y, proba, pred = _data()
    y[:, 3] = 0
    head = mm.point_metrics(y, proba, pred)
    assert head["map"] == pytest.approx(np.mean([skm.average_precision_score(y[:, j], proba[:, j])
                                                 for j in range(3)]))
    assert head["f1_macro"] == pytest.approx(skm.f1_score(y[:, :3], pred[:, :3], average="macro", zero_division=0))
    assert mm.per_label_ap(y, proba)[3] is None


def test_frequency_baseline():
    y, _, _ = _data(n=200)
    freq = y.mean(0)
    base = mm.frequency_baseline(y, freq, simulations=200, seed=0)
    # constant scores: AP is the label's prevalence, as scikit-learn computes it
    for j in range(4):
        constant = np.full(len(y), freq[j])
        assert base["per_label_ap"][j] == pytest.approx(skm.average_precision_score(y[:, j], constant))
    # random decisions at the label's rate: expected F1 of label j is about its prevalence
    assert base["per_label_f1"][0] == pytest.approx(freq[0], abs=0.05)
    assert 0 < base["f1_macro_std"] < 0.1
    assert mm.cooccurrence(y)[0, 0] == y[:, 0].sum()
    assert mm.cooccurrence(y)[0, 1] == int((y[:, 0] & y[:, 1]).sum())


def test_asl_without_focusing_or_clipping_is_bce_and_pos_weight():
    logits = torch.randn(8, 3)
    targets = (torch.rand(8, 3) < 0.4).float()
    asl = tml.AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0)
    assert asl(logits, targets).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, targets).item(), rel=1e-5)
    # focusing lowers the loss of easy negatives: ASL's default is below BCE on the same batch
    assert tml.AsymmetricLoss()(logits, targets).item() < asl(logits, targets).item()
    weights = tml.pos_weight(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    assert weights.tolist() == [1.0, 3.0, 1.0]  # 2 neg / 2 pos, 3 neg / 1 pos, no positive -> 1


def test_labels_the_model_does_not_know_are_left_out_and_counted(caplog):
    import pandas as pd

    from imgclf.evaluate import _multilabel

    frame = pd.DataFrame({"row": [0, 1, 2], "path": ["a", "b", "c"], "url": ["", "", ""],
                          "label": ["red|new_tag", "new_tag", "dress"]})
    images = _multilabel.Images(frame, ".", "test", "manifest")
    with caplog.at_level("WARNING", logger="imgclf.evaluate"):
        kept, unknown = _multilabel.known_labels_only(images, ["dress", "red"], "|")
    assert kept.frame["label"].tolist() == ["red", "", "dress"]
    assert unknown == {"new_tag": 2}
    assert "'new_tag' (2)" in caplog.text
