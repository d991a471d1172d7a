"""Metric, bootstrap and baseline helpers, checked on cases small enough to compute by hand
and against scikit-learn computed independently here."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from imgclf.evaluate import _metrics as M


def test_weighted_random_accuracy_is_the_dot_product_of_shares() -> None:
    # Test labels 0,0,0,1 (shares .75/.25) against a guesser drawing 0 with p=.75:
    # P(correct) = .75*.75 + .25*.25 = .625.
    out = M.random_baseline(np.array([0, 0, 0, 1]), np.array([0.75, 0.25]), simulations=10, seed=1)
    assert out["accuracy"] == pytest.approx(0.625)


def test_weighted_random_f1_matches_hand_enumeration() -> None:
    # y = [0, 1], guesses drawn 50/50. The four equally likely guess pairs give F1-macro:
    # (0,0): class0 2*1/(2+1) = 2/3, class1 0 -> 1/3;  (1,1): 1/3;  (0,1): 1;  (1,0): 0.
    # Mean 5/12, variance 11/36 - (5/12)^2 = 19/144.
    out = M.random_baseline(np.array([0, 1]), np.array([0.5, 0.5]), simulations=40_000, seed=3)
    assert out["f1_macro"] == pytest.approx(5 / 12, abs=0.01)
    assert out["f1_macro_std"] == pytest.approx(math.sqrt(19) / 12, abs=0.01)
    assert out["log_loss"] == pytest.approx(math.log(2))
    assert out["simulations"] == 40_000


def test_weighted_random_f1_matches_exact_expectation_on_a_skewed_case() -> None:
    y = np.array([0, 0, 1, 2])
    shares = np.array([0.6, 0.3, 0.1])
    exact = 0.0
    for guess in itertools.product(range(3), repeat=len(y)):
        weight = np.prod(shares[list(guess)])
        exact += weight * f1_score(y, guess, average="macro", zero_division=0)
    out = M.random_baseline(y, shares, simulations=40_000, seed=0)
    assert out["f1_macro"] == pytest.approx(exact, abs=0.01)
    assert out["accuracy"] == pytest.approx(0.5 * 0.6 + 0.25 * 0.3 + 0.25 * 0.1)


def test_random_baseline_is_seeded_and_degenerate_shares_are_exact() -> None:
    y = np.array([0, 0, 1, 1])
    a = M.random_baseline(y, np.array([0.3, 0.7]), simulations=50, seed=7)
    b = M.random_baseline(y, np.array([0.3, 0.7]), simulations=50, seed=7)
    assert a == b
    # Always guessing 0: class0 F1 = 2*2/(4+2) = 2/3, class1 F1 = 0.
    always = M.random_baseline(y, np.array([1.0, 0.0]), simulations=20, seed=0)
    assert always["f1_macro"] == pytest.approx(1 / 3)
    assert always["f1_macro_std"] == pytest.approx(0.0, abs=1e-12)
    assert always["log_loss"] is None  # class 1 has probability 0: infinite loss, stored as null


def test_majority_baseline_by_hand() -> None:
    # Training majority is class 1; test labels 0,1,1,2: accuracy 2/4;
    # F1: class1 = 2*2/(2*2+2) = 2/3, classes 0 and 2 = 0 -> macro 2/9.
    out = M.majority_baseline(np.array([0, 1, 1, 2]), np.array([0.2, 0.5, 0.3]))
    assert out == {"class_index": 1, "accuracy": 0.5, "f1_macro": pytest.approx(2 / 9)}


def test_class_shares() -> None:
    assert M.class_shares(np.array([0, 2, 2, 2]), 4).tolist() == [0.25, 0.0, 0.75, 0.0]
    with pytest.raises(ValueError):
        M.class_shares(np.array([], dtype=int), 3)


@pytest.mark.parametrize("seed", range(5))
def test_f1_from_confusion_equals_sklearn_including_absent_classes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 6
    y_true = rng.integers(0, 4, 40)  # classes 4 and 5 never true
    y_pred = rng.integers(0, 5, 40)  # class 5 never predicted: excluded from the mean, as sklearn does
    cm = M.confusion(y_true, y_pred, k)
    assert cm.sum() == 40 and cm[5].sum() == 0
    assert M.f1_macro_from_confusion(cm) == pytest.approx(
        f1_score(y_true, y_pred, average="macro", zero_division=0))


def test_bootstrap_equals_a_plain_loop_with_sklearn() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 60)
    y_pred = np.where(rng.random(60) < 0.7, y_true, rng.integers(0, 4, 60))
    ci = M.bootstrap_ci(y_true, y_pred, 4, resamples=300, seed=11)

    idx = np.random.default_rng(11).integers(0, 60, size=(300, 60))
    f1 = [f1_score(y_true[i], y_pred[i], average="macro", zero_division=0) for i in idx]
    acc = [np.mean(y_true[i] == y_pred[i]) for i in idx]
    assert ci["f1_macro"] == pytest.approx(np.percentile(f1, [2.5, 97.5]).tolist())
    assert ci["accuracy"] == pytest.approx(np.percentile(acc, [2.5, 97.5]).tolist())
    point = f1_score(y_true, y_pred, average="macro")
    assert ci["f1_macro"][0] < point < ci["f1_macro"][1]


def test_bootstrap_is_seeded_and_chunking_keeps_every_resample(monkeypatch: pytest.MonkeyPatch) -> None:
    y = np.array([0, 1, 2, 0, 1, 2, 0, 0])
    p = np.array([0, 1, 1, 0, 2, 2, 0, 1])
    assert M.bootstrap_ci(y, p, 3, resamples=100, seed=5) == M.bootstrap_ci(y, p, 3, resamples=100, seed=5)
    monkeypatch.setattr(M, "_MAX_CHUNK_CELLS", 8 * 7)  # 7 resamples per chunk: 15 chunks
    assert sum(M._chunks(100, 8, 3)) == 100
    ci = M.bootstrap_ci(y, p, 3, resamples=100, seed=5)
    assert 0.0 <= ci["accuracy"][0] <= 5 / 8 <= ci["accuracy"][1] <= 1.0


def test_classification_metrics_top5_only_above_five_classes() -> None:
    y = np.array([0, 1, 2])
    proba = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    out = M.classification_metrics(y, proba)
    assert out["top5_accuracy"] is None
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["log_loss"] == pytest.approx(-(math.log(0.7) + math.log(0.5) + math.log(0.1)) / 3)

    # 6 classes: the true class of image 1 is ranked last (6th), so top-5 misses it.
    proba6 = np.array([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1],
                       [0.3, 0.25, 0.2, 0.15, 0.08, 0.02]])
    out6 = M.classification_metrics(np.array([0, 5]), proba6)
    assert out6["top5_accuracy"] == 0.5


def test_per_class_and_most_confused() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0, 1])
    table = M.per_class(y_true, y_pred, ["a", "b", "c", "d"])
    assert table["a"] == {"precision": 0.5, "recall": pytest.approx(1 / 3), "f1": 0.4, "support": 3}
    assert table["d"]["support"] == 0
    cm = M.confusion(y_true, y_pred, 4)
    assert M.most_confused(cm) == [(0, 1, 2), (1, 0, 1), (2, 1, 1)]
    assert M.most_confused(cm, top=1) == [(0, 1, 2)]


def test_chunks_bound_memory_for_many_classes() -> None:
    # 1000 classes, 50 images: a chunk must not hold 1000 confusion matrices of 10^6 cells each.
    sizes = list(M._chunks(1000, 50, 1000))
    assert sum(sizes) == 1000 and max(sizes) * 1000 * 1000 <= M._MAX_CHUNK_CELLS
    rng = np.random.default_rng(0)
    y = rng.integers(0, 1000, 50)
    ci = M.bootstrap_ci(y, y.copy(), 1000, resamples=40, seed=0)
    assert ci == {"accuracy": [1.0, 1.0], "f1_macro": [1.0, 1.0]}
